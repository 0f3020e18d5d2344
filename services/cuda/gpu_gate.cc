// GpuGate::Create: through the CUDA plugin (services/cuda/plugin.h).
#include "services/cuda/gpu_gate.h"

#include "services/cuda/plugin.h"

namespace moemesh {

absl::StatusOr<std::unique_ptr<GpuGate>> GpuGate::Create(const MoeModelConfig& config,
                                                         const GateWeights& gate, int device) {
  absl::StatusOr<const GpuGateEntry*> entry = CudaPluginTable<GpuGateEntry>(kGpuGateEntry);
  if (!entry.ok()) return entry.status();
  return (*entry)->create(config, gate, device);
}

}  // namespace moemesh
