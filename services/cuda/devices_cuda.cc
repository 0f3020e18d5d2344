// The CUDA plugin's device-count entry (services/cuda/plugin.h).
#include <cuda_runtime_api.h>

#include "services/cuda/plugin.h"

extern "C" __attribute__((visibility("default"))) const char* moemesh_cuda_device_count_v3(
    int* count) {
  *count = 0;
  const cudaError_t e = cudaGetDeviceCount(count);
  if (e == cudaSuccess) return nullptr;
  *count = 0;
  cudaGetLastError();  // cleared: this error was handled here
  return e == cudaErrorNoDevice ? nullptr : cudaGetErrorString(e);
}
