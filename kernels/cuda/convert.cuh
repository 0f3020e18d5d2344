// dtype conversion on the GPU. Host launcher only: callers never see device code.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace moemesh::cuda {

// dst[i] = float(src[i]) for n BF16 values (bit patterns), on `stream`.
cudaError_t Bf16ToF32(const uint16_t* src, float* dst, int64_t n, cudaStream_t stream);
// dst[i] = bf16(src[i]), round to nearest even, NaN preserved.
cudaError_t F32ToBf16(const float* src, uint16_t* dst, int64_t n, cudaStream_t stream);

}  // namespace moemesh::cuda
