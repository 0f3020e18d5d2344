// Resolving the calls of a library loaded with dlopen on first use (cuBLAS in
// kernels/cuda/cublas.cc, NCCL in services/cuda/nccl_node.cc).
#pragma once

#include <dlfcn.h>

namespace moemesh::cuda {

// Sets `*f` to `name` in `lib`; false when it is missing.
template <typename F>
bool ResolveSymbol(void* lib, const char* name, F* f) {
  *f = reinterpret_cast<F>(dlsym(lib, name));
  return *f != nullptr;
}

}  // namespace moemesh::cuda
