#include "services/cuda_plugin.h"

#include <dlfcn.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "services/gpu_gate.h"

namespace moemesh {
namespace {

constexpr char kPluginFile[] = "libmoemesh_cuda.so";

absl::StatusOr<const CudaPluginApi*> Load() {
#ifndef MOEMESH_CUDA_PLUGIN_BUILT
  return absl::UnimplementedError(
      "--device cuda: this build has no CUDA (configured with MOEMESH_CUDA=OFF or without nvcc)");
#else
  std::vector<std::string> candidates;
  if (const char* env = std::getenv("MOEMESH_CUDA_PLUGIN"); env != nullptr && *env != '\0') {
    candidates.push_back(env);
  }
  std::error_code ec;
  const std::filesystem::path exe = std::filesystem::read_symlink("/proc/self/exe", ec);
  if (!ec) {
    candidates.push_back((exe.parent_path() / kPluginFile).string());
    candidates.push_back((exe.parent_path().parent_path() / "lib" / kPluginFile).string());
  }
  candidates.push_back(MOEMESH_CUDA_PLUGIN_BUILT);
  candidates.push_back(kPluginFile);
  std::vector<std::string> errors;
  for (const std::string& path : candidates) {
    if (path.find('/') != std::string::npos && !std::filesystem::exists(path, ec)) continue;
    // Lazy: the plugin's calls into this executable resolve when first made.
    void* lib = dlopen(path.c_str(), RTLD_LAZY | RTLD_LOCAL);
    if (lib == nullptr) {
      errors.push_back(dlerror());
      continue;
    }
    auto entry = reinterpret_cast<CudaPluginEntry>(dlsym(lib, kCudaPluginEntry));
    const CudaPluginApi* api = entry != nullptr ? entry() : nullptr;
    if (api == nullptr || api->version != 2) {
      errors.push_back(absl::StrCat(path, ": not a MoE Mesh CUDA plugin of this version"));
      continue;
    }
    return api;
  }
  return absl::FailedPreconditionError(absl::StrCat(
      "--device cuda: the CUDA plugin ", kPluginFile, " cannot be loaded (",
      errors.empty() ? "not found" : absl::StrJoin(errors, "; "), ")"));
#endif
}

}  // namespace

absl::StatusOr<const CudaPluginApi*> LoadCudaPlugin() {
  static const absl::StatusOr<const CudaPluginApi*> plugin = Load();
  return plugin;
}

bool GpuGate::Available() {
  absl::StatusOr<const CudaPluginApi*> api = LoadCudaPlugin();
  return api.ok() && (*api)->device_count() > 0;
}

absl::StatusOr<std::unique_ptr<GpuGate>> GpuGate::Create(const MoeModelConfig& config, const GateWeights& gate,
                                                         int device) {
  absl::StatusOr<const CudaPluginApi*> api = LoadCudaPlugin();
  if (!api.ok()) return api.status();
  return (*api)->create_gate(config, gate, device);
}

}  // namespace moemesh
