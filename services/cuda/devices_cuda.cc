// The CUDA plugin's device-count entry (services/cuda/plugin.h).
#include "kernels/cuda/device.h"
#include "services/cuda/plugin.h"

extern "C" __attribute__((visibility("default"))) const char* moemesh_cuda_device_count_v3(
    int* count) {
  const cudaError_t e = moemesh::cuda::CountDevices(count);
  return e == cudaSuccess ? nullptr : cudaGetErrorString(e);
}
