// GpuExperts::Create: through the CUDA plugin (services/cuda/plugin.h).
#include "expert_service/gpu_experts.h"

#include "services/cuda/plugin.h"

namespace moemesh {

absl::StatusOr<std::unique_ptr<GpuExperts>> GpuExperts::Create(const MoeModelConfig& config,
                                                               const GpuExpertsOptions& options) {
  absl::StatusOr<const GpuExpertsEntry*> entry = CudaPluginTable<GpuExpertsEntry>(kGpuExpertsEntry);
  if (!entry.ok()) return entry.status();
  return (*entry)->create(config, options);
}

}  // namespace moemesh
