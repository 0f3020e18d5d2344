#include "kernels/cuda/cublas.h"

#include <dlfcn.h>

#include <string>

#include "kernels/cuda/dlsym.h"

namespace moemesh::cuda {
namespace {

const Cublas* Load() {
  const std::string soname = "libcublas.so." + std::to_string(CUBLAS_VER_MAJOR);
  void* lib = dlopen(soname.c_str(), RTLD_NOW | RTLD_LOCAL);
  if (lib == nullptr) return nullptr;
  static Cublas api;
  if (!ResolveSymbol(lib, "cublasCreate_v2", &api.create) ||
      !ResolveSymbol(lib, "cublasDestroy_v2", &api.destroy) ||
      !ResolveSymbol(lib, "cublasSetStream_v2", &api.set_stream) ||
      !ResolveSymbol(lib, "cublasGetStream_v2", &api.get_stream) ||
      !ResolveSymbol(lib, "cublasGemmEx", &api.gemm_ex)) {
    return nullptr;
  }
  return &api;
}

}  // namespace

const Cublas* LoadCublas() {
  static const Cublas* api = Load();
  return api;
}

}  // namespace moemesh::cuda
