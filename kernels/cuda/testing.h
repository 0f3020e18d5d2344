// Helpers for the CUDA tests: whether a device exists, and device buffers made
// from host vectors, poisoned (all bits set) or read back.
#pragma once

#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <vector>

#include "kernels/cuda/device.h"

namespace moemesh::cuda_testing {

// In a test body: skips where the machine has no CUDA device (kernels/cuda/device.h), and
// fails on any other CUDA error: a broken installation must not pass as "no GPU".
#define SKIP_WITHOUT_GPU()                                                                        \
  do {                                                                                            \
    int n_ = 0;                                                                                   \
    const cudaError_t e_ = ::moemesh::cuda::CountDevices(&n_);                                    \
    if (e_ != cudaSuccess) FAIL() << "CUDA cannot count its devices: " << cudaGetErrorString(e_); \
    if (n_ == 0) GTEST_SKIP() << "no CUDA device";                                                \
  } while (0)

// The machine's CUDA devices; a CUDA error other than "none" fails the test.
inline int GpuCount() {
  int n = 0;
  const cudaError_t e = cuda::CountDevices(&n);
  EXPECT_EQ(e, cudaSuccess) << "CUDA cannot count its devices: " << cudaGetErrorString(e);
  return n;
}

template <typename T>
T* Upload(const std::vector<T>& h) {
  T* d = nullptr;
  EXPECT_EQ(cudaMalloc(&d, std::max<size_t>(h.size(), 1) * sizeof(T)), cudaSuccess);
  if (!h.empty()) {
    EXPECT_EQ(cudaMemcpy(d, h.data(), h.size() * sizeof(T), cudaMemcpyHostToDevice), cudaSuccess);
  }
  return d;
}

template <typename T>
T* Poisoned(size_t n) {
  T* d = nullptr;
  EXPECT_EQ(cudaMalloc(&d, std::max<size_t>(n, 1) * sizeof(T)), cudaSuccess);
  EXPECT_EQ(cudaMemset(d, 0xff, std::max<size_t>(n, 1) * sizeof(T)), cudaSuccess);
  return d;
}

template <typename T>
std::vector<T> Download(const T* d, size_t n) {
  std::vector<T> h(n);
  if (n > 0) {
    EXPECT_EQ(cudaMemcpy(h.data(), d, n * sizeof(T), cudaMemcpyDeviceToHost), cudaSuccess);
  }
  return h;
}

// A device buffer that frees itself: a copy of a host vector, or `count` poisoned
// elements.
template <typename T>
struct DeviceVector {
  explicit DeviceVector(const std::vector<T>& host) : ptr(Upload(host)), n(host.size()) {}
  explicit DeviceVector(size_t count) : ptr(Poisoned<T>(count)), n(count) {}
  DeviceVector(const DeviceVector&) = delete;
  DeviceVector& operator=(const DeviceVector&) = delete;
  ~DeviceVector() { cudaFree(ptr); }
  std::vector<T> Host() const { return Download(ptr, n); }
  T* ptr;
  size_t n;
};

}  // namespace moemesh::cuda_testing
