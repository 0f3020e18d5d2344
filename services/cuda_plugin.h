// The CUDA plugin: everything that needs the CUDA runtime (the kernels, GpuGate for router
// --device cuda, GpuExperts for expert --device cuda) is built into libmoemesh_cuda.so and
// loaded with dlopen on first use. The services' binaries link no CUDA library, so they
// run on machines without CUDA, and their threads keep their stacks: the static TLS of
// libraries linked at start lives at the top of every thread's stack, and civetweb's
// threads have 100 KB, most of it already taken by OpenBLAS (a dlopen'ed library's TLS
// is allocated on demand instead). The plugin resolves the services' own symbols from the
// executable, which therefore exports them (ENABLE_EXPORTS).
//
// Where it is looked for: $MOEMESH_CUDA_PLUGIN, then libmoemesh_cuda.so beside the
// executable, then ../lib/, then where the build put it, then the loader's search path.
#pragma once

#include <memory>

#include "absl/status/statusor.h"

namespace moemesh {

struct MoeModelConfig;
struct GateWeights;
class GpuGate;
class GpuExperts;
struct GpuExpertsOptions;

struct CudaPluginApi {
  int version = 2;
  // How many CUDA devices are usable.
  int (*device_count)() = nullptr;
  absl::StatusOr<std::unique_ptr<GpuGate>> (*create_gate)(const MoeModelConfig& config,
                                                          const GateWeights& gate, int device) = nullptr;
  absl::StatusOr<std::unique_ptr<GpuExperts>> (*create_experts)(const MoeModelConfig& config,
                                                                const GpuExpertsOptions& options) = nullptr;
};

// The plugin's entry point, by this name.
using CudaPluginEntry = const CudaPluginApi* (*)();
inline constexpr char kCudaPluginEntry[] = "moemesh_cuda_plugin_v2";

// Loads the plugin once; UNIMPLEMENTED in a build without CUDA, FAILED_PRECONDITION naming
// what dlopen said when it cannot be loaded.
absl::StatusOr<const CudaPluginApi*> LoadCudaPlugin();

// Defined in the plugin (services/gpu_gate.cc, expert_service/gpu_experts.cc).
absl::StatusOr<std::unique_ptr<GpuGate>> CreateCudaGpuGate(const MoeModelConfig& config,
                                                          const GateWeights& gate, int device);
absl::StatusOr<std::unique_ptr<GpuExperts>> CreateCudaGpuExperts(const MoeModelConfig& config,
                                                                const GpuExpertsOptions& options);

}  // namespace moemesh
