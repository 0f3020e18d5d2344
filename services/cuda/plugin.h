// The CUDA plugin, libmoemesh_cuda.so: every piece of code that needs the CUDA runtime,
// loaded with dlopen on first use, so that the services' binaries link no CUDA library
// (docs/architecture.md says why). Each component with code in the plugin publishes its
// own extern "C" entry point, a versioned name that returns a table of functions; this
// loader finds the plugin and looks entry points up by name, and knows no component's
// types.
//
// Where the plugin is looked for: $MOEMESH_CUDA_PLUGIN, then libmoemesh_cuda.so beside the
// executable, then ../lib/, then where the build put it, then the loader's search path.
// Thread-safe; the plugin is loaded once per process.
#pragma once

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"

namespace moemesh {

// The entry point named `entry`. UNIMPLEMENTED in a build without CUDA;
// FAILED_PRECONDITION naming what dlopen or dlsym said when the plugin cannot be loaded or
// lacks the entry.
absl::StatusOr<void*> CudaPluginSymbol(const char* entry);

// The table a component's entry point returns: a struct with `static constexpr int
// kVersion` and an `int version` member. FAILED_PRECONDITION for a plugin of another
// version.
template <typename Table>
absl::StatusOr<const Table*> CudaPluginTable(const char* entry) {
  absl::StatusOr<void*> symbol = CudaPluginSymbol(entry);
  if (!symbol.ok()) return symbol.status();
  const Table* table = reinterpret_cast<const Table* (*)()>(*symbol)();
  if (table == nullptr || table->version != Table::kVersion) {
    return absl::FailedPreconditionError(
        absl::StrCat("the CUDA plugin's ", entry, " is not of this build's version"));
  }
  return table;
}

// CUDA devices usable here: 0 when the machine has none (cudaErrorNoDevice). Any other
// failure (the plugin cannot be loaded, a driver older than the CUDA runtime needs) is an
// error naming it, never "no device".
absl::StatusOr<int> CudaDeviceCount();

// The plugin's device-count entry: returns nullptr and sets *count (0 for no device), or
// CUDA's message for any other error.
inline constexpr char kCudaDeviceCountEntry[] = "moemesh_cuda_device_count_v3";
using CudaDeviceCountFn = const char* (*)(int* count);

}  // namespace moemesh
