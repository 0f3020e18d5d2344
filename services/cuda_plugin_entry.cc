// The CUDA plugin's entry point (services/cuda_plugin.h).
#include <cuda_runtime_api.h>

#include "services/cuda_plugin.h"

namespace moemesh {
namespace {

int DeviceCount() {
  int n = 0;
  return cudaGetDeviceCount(&n) == cudaSuccess ? n : 0;
}

const CudaPluginApi kApi{2, &DeviceCount, &CreateCudaGpuGate, &CreateCudaGpuExperts};

}  // namespace
}  // namespace moemesh

extern "C" __attribute__((visibility("default"))) const moemesh::CudaPluginApi* moemesh_cuda_plugin_v2() {
  return &moemesh::kApi;
}
