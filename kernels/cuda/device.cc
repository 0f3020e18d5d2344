#include "kernels/cuda/device.h"

#include <dlfcn.h>

namespace moemesh::cuda {
namespace {

// Whether the NVIDIA driver's library is installed at all.
bool HaveDriver() {
  void* lib = dlopen("libcuda.so.1", RTLD_LAZY | RTLD_LOCAL);
  if (lib == nullptr) return false;
  dlclose(lib);
  return true;
}

}  // namespace

cudaError_t CountDevices(int* count) {
  *count = 0;
  int n = 0;
  const cudaError_t e = cudaGetDeviceCount(&n);
  cudaGetLastError();  // handled here
  if (e == cudaSuccess) {
    *count = n;
    return cudaSuccess;
  }
  if (e == cudaErrorNoDevice) return cudaSuccess;
  if (e == cudaErrorInsufficientDriver && !HaveDriver()) return cudaSuccess;
  return e;
}

}  // namespace moemesh::cuda
