#include "services/cuda/plugin.h"

#include <dlfcn.h>

#include <cstdlib>
#include <filesystem>
#include <string>
#include <vector>

#include "absl/strings/str_join.h"

namespace moemesh {
namespace {

constexpr char kPluginFile[] = "libmoemesh_cuda.so";

absl::StatusOr<void*> Load() {
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
    if (lib != nullptr) return lib;
    errors.push_back(dlerror());
  }
  return absl::FailedPreconditionError(
      absl::StrCat("--device cuda: the CUDA plugin ", kPluginFile, " cannot be loaded (",
                   errors.empty() ? "not found" : absl::StrJoin(errors, "; "), ")"));
#endif
}

}  // namespace

absl::StatusOr<void*> CudaPluginSymbol(const char* entry) {
  static const absl::StatusOr<void*> plugin = Load();
  if (!plugin.ok()) return plugin.status();
  void* symbol = dlsym(*plugin, entry);
  if (symbol == nullptr) {
    return absl::FailedPreconditionError(
        absl::StrCat("the CUDA plugin ", kPluginFile, " has no ", entry, " (another version?)"));
  }
  return symbol;
}

absl::StatusOr<int> CudaDeviceCount() {
  absl::StatusOr<void*> symbol = CudaPluginSymbol(kCudaDeviceCountEntry);
  if (!symbol.ok()) return symbol.status();
  int count = 0;
  if (const char* error = reinterpret_cast<CudaDeviceCountFn>(*symbol)(&count); error != nullptr) {
    return absl::FailedPreconditionError(absl::StrCat("CUDA cannot count its devices: ", error));
  }
  return count;
}

}  // namespace moemesh
