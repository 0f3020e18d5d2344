// For the tests of code that reaches the GPU through the CUDA plugin (GpuGate,
// GpuExperts): whether the machine has a device, with a failure to load the plugin or to
// count the devices reported as a failure, never as "no GPU".
#pragma once

#include <gtest/gtest.h>

#include "services/cuda/plugin.h"

namespace moemesh::cuda_testing {

// The devices the plugin sees; a plugin or CUDA error fails the test (and counts as 0).
inline int PluginGpuCount() {
  const absl::StatusOr<int> n = CudaDeviceCount();
  if (!n.ok() && n.status().code() != absl::StatusCode::kUnimplemented) {
    ADD_FAILURE() << "the CUDA plugin cannot count the devices: " << n.status();
  }
  return n.ok() ? *n : 0;
}

}  // namespace moemesh::cuda_testing

// In a test body: skips where the machine has no CUDA device or the build has no CUDA;
// fails on any other error.
#define SKIP_WITHOUT_PLUGIN_GPU()                                             \
  do {                                                                        \
    const absl::StatusOr<int> n_ = ::moemesh::CudaDeviceCount();              \
    if (!n_.ok() && n_.status().code() != absl::StatusCode::kUnimplemented) { \
      FAIL() << "the CUDA plugin cannot count the devices: " << n_.status();  \
    }                                                                         \
    if (!n_.ok() || *n_ == 0) GTEST_SKIP() << "no CUDA device";               \
  } while (0)
