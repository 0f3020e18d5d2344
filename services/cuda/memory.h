// For the CUDA plugin's host code (services/cuda/gpu_gate_cuda.cc,
// expert_service/gpu_experts_cuda.cc): CUDA errors as absl::Status, the device check, and device /
// pinned host memory that frees itself.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "kernels/cuda/device.h"

namespace moemesh::cuda_memory {

// RESOURCE_EXHAUSTED for an allocation that failed, INTERNAL otherwise; names `what`.
inline absl::Status CudaError(const char* what, cudaError_t e) {
  const absl::StatusCode code = e == cudaErrorMemoryAllocation
                                    ? absl::StatusCode::kResourceExhausted
                                    : absl::StatusCode::kInternal;
  return absl::Status(code, absl::StrCat(what, ": ", cudaGetErrorString(e)));
}

#define CUDA_RETURN_IF_ERROR(what, call)                    \
  do {                                                      \
    if (cudaError_t e_ = (call); e_ != cudaSuccess) {       \
      return ::moemesh::cuda_memory::CudaError((what), e_); \
    }                                                       \
  } while (0)

// OK when `device` names a CUDA device here; FAILED_PRECONDITION without any (for
// --device cuda) or when CUDA cannot count them (naming its error), INVALID_ARGUMENT for a
// number out of range (--gpu).
inline absl::Status CheckDevice(int device) {
  int n = 0;
  if (const cudaError_t e = cuda::CountDevices(&n); e != cudaSuccess) {
    return absl::FailedPreconditionError(
        absl::StrCat("--device cuda: CUDA cannot count its devices: ", cudaGetErrorString(e)));
  }
  if (n == 0) return absl::FailedPreconditionError("--device cuda: no CUDA device here");
  if (device < 0 || device >= n) {
    return absl::InvalidArgumentError(
        absl::StrCat("--gpu ", device, ": this machine has ", n, " CUDA device(s)"));
  }
  return absl::OkStatus();
}

// Memory from `Alloc`, given back with `Free` by its owner; grown (never shrunk) by Reserve.
template <cudaError_t (*Alloc)(void**, size_t), cudaError_t (*Free)(void*)>
struct Buffer {
  void* ptr = nullptr;
  size_t bytes = 0;
  Buffer() = default;
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  ~Buffer() {
    if (ptr != nullptr) Free(ptr);
  }
  template <typename T>
  T* as() const {
    return static_cast<T*>(ptr);
  }
  absl::Status Reserve(size_t n, const char* what) {
    if (n <= bytes) return absl::OkStatus();
    if (ptr != nullptr) Free(ptr);
    ptr = nullptr;
    bytes = 0;
    if (const cudaError_t e = Alloc(&ptr, n); e != cudaSuccess) {
      ptr = nullptr;
      cudaGetLastError();  // handled here: a later launch check must not see it
      return CudaError(what, e);
    }
    bytes = n;
    return absl::OkStatus();
  }
};
inline cudaError_t DeviceAlloc(void** p, size_t n) { return cudaMalloc(p, n); }
inline cudaError_t PinnedAlloc(void** p, size_t n) { return cudaMallocHost(p, n); }
using DeviceBuffer = Buffer<&DeviceAlloc, &cudaFree>;
using PinnedBuffer = Buffer<&PinnedAlloc, &cudaFreeHost>;

}  // namespace moemesh::cuda_memory
