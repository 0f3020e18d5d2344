// How many CUDA devices this machine has, telling "none" apart from a failure: a test or a
// service may treat "none" as a reason to skip or refuse, but never a broken installation.
#pragma once

#include <cuda_runtime_api.h>

namespace moemesh::cuda {

// cudaSuccess with *count = the devices, 0 when the machine has none: no NVIDIA driver
// (libcuda.so.1 absent, which the runtime reports as cudaErrorInsufficientDriver) or a
// driver that sees no device (cudaErrorNoDevice). Any other error is returned as it is
// (a driver older than this runtime needs, a broken installation), *count = 0. Clears
// the runtime's last-error state either way, so a later launch check does not see it.
cudaError_t CountDevices(int* count);

}  // namespace moemesh::cuda
