// Launch-error checks that see only the launch they follow. cudaGetLastError returns the
// last error of any runtime call on this thread, one its caller already handled (a failed
// cudaMalloc) included, which would fail a good launch: launchers clear it first.
#pragma once

#include <cuda_runtime_api.h>

namespace moemesh::cuda {

// Call right before a launcher's first kernel launch.
inline void ForgetEarlierErrors() { (void)cudaGetLastError(); }

}  // namespace moemesh::cuda
