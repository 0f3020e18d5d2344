#include "kernels/cuda/cublas.h"

#include <dlfcn.h>

#include <string>

namespace moemesh::cuda {
namespace {

template <typename F>
bool Resolve(void* lib, const char* name, F* f) {
  *f = reinterpret_cast<F>(dlsym(lib, name));
  return *f != nullptr;
}

const Cublas* Load() {
  const std::string soname = "libcublas.so." + std::to_string(CUBLAS_VER_MAJOR);
  void* lib = dlopen(soname.c_str(), RTLD_NOW | RTLD_LOCAL);
  if (lib == nullptr) return nullptr;
  static Cublas api;
  if (!Resolve(lib, "cublasCreate_v2", &api.create) || !Resolve(lib, "cublasDestroy_v2", &api.destroy) ||
      !Resolve(lib, "cublasSetStream_v2", &api.set_stream) ||
      !Resolve(lib, "cublasGetStream_v2", &api.get_stream) || !Resolve(lib, "cublasGemmEx", &api.gemm_ex)) {
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
