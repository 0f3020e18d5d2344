// GpuExperts::Available / Create: through the CUDA plugin (services/cuda_plugin.h).
#include "expert_service/gpu_experts.h"
#include "services/cuda_plugin.h"

namespace moemesh {

int GpuExperts::DeviceCount() {
  absl::StatusOr<const CudaPluginApi*> api = LoadCudaPlugin();
  return api.ok() ? (*api)->device_count() : 0;
}

absl::StatusOr<std::unique_ptr<GpuExperts>> GpuExperts::Create(const MoeModelConfig& config,
                                                            const GpuExpertsOptions& options) {
  absl::StatusOr<const CudaPluginApi*> api = LoadCudaPlugin();
  if (!api.ok()) return api.status();
  return (*api)->create_experts(config, options);
}

}  // namespace moemesh
