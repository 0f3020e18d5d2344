#include "kernels/cuda/convert.cuh"
#include "kernels/cuda/launch.cuh"

namespace moemesh::cuda {
namespace {

__global__ void Bf16ToF32Kernel(const uint16_t* __restrict__ src, float* __restrict__ dst,
                                int64_t n) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x) {
    dst[i] = __uint_as_float(static_cast<uint32_t>(src[i]) << 16);
  }
}

__global__ void F32ToBf16Kernel(const float* __restrict__ src, uint16_t* __restrict__ dst,
                                int64_t n) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x) {
    uint32_t bits = __float_as_uint(src[i]);
    if ((bits & 0x7fffffffu) > 0x7f800000u) {
      dst[i] = static_cast<uint16_t>((bits >> 16) | 0x40);
    } else {
      bits += 0x7fffu + ((bits >> 16) & 1u);
      dst[i] = static_cast<uint16_t>(bits >> 16);
    }
  }
}

unsigned GridFor(int64_t n) {
  const int64_t blocks = (n + 255) / 256;
  return static_cast<unsigned>(blocks < 65535 ? (blocks > 0 ? blocks : 1) : 65535);
}

}  // namespace

cudaError_t Bf16ToF32(const uint16_t* src, float* dst, int64_t n, cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  ForgetEarlierErrors();
  Bf16ToF32Kernel<<<GridFor(n), 256, 0, stream>>>(src, dst, n);
  return cudaGetLastError();
}

cudaError_t F32ToBf16(const float* src, uint16_t* dst, int64_t n, cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  ForgetEarlierErrors();
  F32ToBf16Kernel<<<GridFor(n), 256, 0, stream>>>(src, dst, n);
  return cudaGetLastError();
}

}  // namespace moemesh::cuda
