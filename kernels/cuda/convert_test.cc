#include "kernels/cuda/convert.cuh"

#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <random>
#include <vector>

#include "kernels/cuda/testing.h"
#include "kernels/dtype.h"

namespace moemesh {
namespace {

TEST(CudaConvertTest, MatchesCpuConversion) {
  SKIP_WITHOUT_GPU();
  const int64_t n = 1 << 20;
  std::mt19937 rng(1);
  std::normal_distribution<float> nd(0, 100);
  std::vector<float> src(n);
  for (float& v : src) v = nd(rng);
  float* d_f = nullptr;
  uint16_t* d_h = nullptr;
  ASSERT_EQ(cudaMalloc(&d_f, n * sizeof(float)), cudaSuccess);
  ASSERT_EQ(cudaMalloc(&d_h, n * sizeof(uint16_t)), cudaSuccess);
  ASSERT_EQ(cudaMemcpy(d_f, src.data(), n * sizeof(float), cudaMemcpyHostToDevice), cudaSuccess);
  ASSERT_EQ(cuda::F32ToBf16(d_f, d_h, n, nullptr), cudaSuccess);
  ASSERT_EQ(cudaMemset(d_f, 0xff, n * sizeof(float)), cudaSuccess);  // poison
  ASSERT_EQ(cuda::Bf16ToF32(d_h, d_f, n, nullptr), cudaSuccess);
  std::vector<uint16_t> h(n);
  std::vector<float> back(n);
  ASSERT_EQ(cudaMemcpy(h.data(), d_h, n * 2, cudaMemcpyDeviceToHost), cudaSuccess);
  ASSERT_EQ(cudaMemcpy(back.data(), d_f, n * 4, cudaMemcpyDeviceToHost), cudaSuccess);
  for (int64_t i = 0; i < n; ++i) {
    ASSERT_EQ(h[i], F32ToBf16(src[i])) << i;
    ASSERT_EQ(back[i], Bf16ToF32(h[i])) << i;
  }
  cudaFree(d_f);
  cudaFree(d_h);
}

}  // namespace
}  // namespace moemesh
