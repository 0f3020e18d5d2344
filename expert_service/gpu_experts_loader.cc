// GpuExperts::Available / Create: through the CUDA plugin (services/cuda_plugin.h).
#include "expert_service/gpu_experts.h"
#include "services/cuda_plugin.h"

namespace moemesh {

bool GpuExperts::Available() {
  absl::StatusOr<const CudaPluginApi*> api = LoadCudaPlugin();
  return api.ok() && (*api)->available();
}

absl::StatusOr<std::unique_ptr<GpuExperts>> GpuExperts::Create(const MoeModelConfig& config, int device) {
  absl::StatusOr<const CudaPluginApi*> api = LoadCudaPlugin();
  if (!api.ok()) return api.status();
  return (*api)->create_experts(config, device);
}

}  // namespace moemesh
