// The GPU routing against the CPU one (kernels/cpu/routing, itself checked against a
// slow reference), for every family's parameters; and the cuBLAS router logits against
// a double-precision product. Skips without a CUDA device.
#include "kernels/cuda/routing.cuh"

#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <random>
#include <vector>

#include "kernels/cpu/routing_testing.h"
#include "kernels/cuda/cublas.h"
#include "kernels/cuda/testing.h"
#include "kernels/dtype.h"

namespace moemesh {
namespace {

using cuda_testing::DeviceVector;

using Case = RoutingCase;

class CudaRoutingTest : public ::testing::TestWithParam<Case> {};

TEST_P(CudaRoutingTest, MatchesTheCpuRouting) {
  SKIP_WITHOUT_GPU();
  const Case& c = GetParam();
  ASSERT_EQ(c.params.Validate(), "");
  const int E = c.params.num_experts, k = c.params.top_k;
  for (int64_t T : {1, 7, 64, 1000}) {
    SCOPED_TRACE(testing::Message() << c.name << " T=" << T);
    std::mt19937 rng(static_cast<uint32_t>(T * 131 + E));
    std::normal_distribution<float> nd(0.0f, 2.0f);
    std::vector<float> logits(T * E), bias(E);
    for (float& v : logits) v = nd(rng);
    for (float& v : bias) v = 0.1f * nd(rng);
    std::vector<int32_t> ids(T * k);
    std::vector<float> w(T * k), scores(T * E);
    RouteTopK(c.params, logits.data(), T, c.bias ? bias.data() : nullptr, ids.data(), w.data(),
              scores.data());

    DeviceVector<float> d_logits(logits), d_bias(bias), d_w(T * k), d_scores(T * E);
    DeviceVector<int32_t> d_ids(T * k);
    ASSERT_EQ(cuda::RouteTopK(c.params, d_logits.ptr, T, c.bias ? d_bias.ptr : nullptr, d_ids.ptr,
                              d_w.ptr, d_scores.ptr, nullptr),
              cudaSuccess);
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    EXPECT_EQ(d_ids.Host(), ids);
    const std::vector<float> gw = d_w.Host(), gs = d_scores.Host();
    for (size_t i = 0; i < w.size(); ++i) {
      ASSERT_NEAR(gw[i], w[i], 1e-5f * std::max(1.0f, std::abs(w[i]))) << "weight " << i;
    }
    for (size_t i = 0; i < scores.size(); ++i) {
      ASSERT_NEAR(gs[i], scores[i], 1e-5f * std::max(1e-2f, std::abs(scores[i]))) << "score " << i;
    }
  }
}

TEST_P(CudaRoutingTest, NoScoresWantedAndNoTokens) {
  SKIP_WITHOUT_GPU();
  const Case& c = GetParam();
  const int E = c.params.num_experts, k = c.params.top_k;
  const int64_t T = 5;
  std::vector<float> logits(T * E);
  std::mt19937 rng(7);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  for (float& v : logits) v = nd(rng);
  std::vector<int32_t> ids(T * k);
  std::vector<float> w(T * k);
  RouteTopK(c.params, logits.data(), T, nullptr, ids.data(), w.data(), nullptr);
  DeviceVector<float> d_logits(logits), d_w(T * k);
  DeviceVector<int32_t> d_ids(T * k);
  ASSERT_EQ(
      cuda::RouteTopK(c.params, d_logits.ptr, T, nullptr, d_ids.ptr, d_w.ptr, nullptr, nullptr),
      cudaSuccess);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  EXPECT_EQ(d_ids.Host(), ids);
  ASSERT_EQ(
      cuda::RouteTopK(c.params, d_logits.ptr, 0, nullptr, d_ids.ptr, d_w.ptr, nullptr, nullptr),
      cudaSuccess);
  RoutingParams bad = c.params;
  bad.top_k = E + 1;
  EXPECT_EQ(cuda::RouteTopK(bad, d_logits.ptr, T, nullptr, d_ids.ptr, d_w.ptr, nullptr, nullptr),
            cudaErrorInvalidValue);
}

// NaN logits (a whole token, and single experts) choose as the CPU routing does: NaN is
// -inf in the choice on both.
TEST_P(CudaRoutingTest, NanLogitsChooseAsTheCpuDoes) {
  SKIP_WITHOUT_GPU();
  const Case& c = GetParam();
  const int E = c.params.num_experts, k = c.params.top_k;
  const int64_t T = 16;
  std::mt19937 rng(11);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  std::vector<float> logits(T * E), bias(E);
  for (float& v : logits) v = nd(rng);
  for (float& v : bias) v = 0.1f * nd(rng);
  for (int e = 0; e < E; ++e) logits[e] = NAN;                        // token 0: all NaN
  for (int64_t t = 1; t < T; ++t) logits[t * E + (t * 7) % E] = NAN;  // one NaN each
  std::vector<int32_t> ids(T * k);
  std::vector<float> w(T * k);
  RouteTopK(c.params, logits.data(), T, c.bias ? bias.data() : nullptr, ids.data(), w.data(),
            nullptr);
  DeviceVector<float> d_logits(logits), d_bias(bias), d_w(T * k);
  DeviceVector<int32_t> d_ids(T * k);
  ASSERT_EQ(cuda::RouteTopK(c.params, d_logits.ptr, T, c.bias ? d_bias.ptr : nullptr, d_ids.ptr,
                            d_w.ptr, nullptr, nullptr),
            cudaSuccess);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  EXPECT_EQ(d_ids.Host(), ids) << c.name;
}

// Every family's parameters, a wide one (1024 experts in 16 groups) and the widest the
// kernel takes (8192: over the 48 KiB of shared memory a launch gets without opting in).
std::vector<Case> Cases() {
  std::vector<Case> cases = FamilyRoutingCases();
  cases.push_back(
      {"wide", MakeRouting(1024, 16, Scoring::kSigmoid, true, 1.0f, 16, 5, GroupScore::kTop2Sum),
       true});
  cases.push_back({"widest",
                   MakeRouting(8192, 8, Scoring::kSigmoid, true, 1.0f, 8, 4, GroupScore::kTop2Sum),
                   true});
  return cases;
}

INSTANTIATE_TEST_SUITE_P(Families, CudaRoutingTest, ::testing::ValuesIn(Cases()),
                         [](const auto& info) { return std::string(info.param.name); });

class CudaRouterLogitsTest : public ::testing::TestWithParam<cuda::RouterDType> {};

TEST_P(CudaRouterLogitsTest, MatchesADoubleProduct) {
  SKIP_WITHOUT_GPU();
  const bool bf16 = GetParam() == cuda::RouterDType::kBF16;
  const int64_t T = 37, H = 96;
  const int E = 24;
  std::mt19937 rng(3);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  std::vector<float> x(T * H), w(E * H), bias(E);
  for (float& v : x) v = nd(rng);
  for (float& v : w) v = nd(rng);
  for (float& v : bias) v = nd(rng);
  std::vector<uint16_t> xb(x.size()), wb(w.size());
  if (bf16) {  // the product is of the rounded values
    for (size_t i = 0; i < x.size(); ++i) x[i] = Bf16ToF32(xb[i] = F32ToBf16(x[i]));
    for (size_t i = 0; i < w.size(); ++i) w[i] = Bf16ToF32(wb[i] = F32ToBf16(w[i]));
  }
  DeviceVector<float> d_x(x), d_w(w), d_bias(bias), d_out(T * E);
  DeviceVector<uint16_t> d_xb(xb), d_wb(wb);
  cublasHandle_t handle;
  const cuda::Cublas* cublas = cuda::LoadCublas();
  ASSERT_NE(cublas, nullptr) << "libcublas cannot be loaded";
  ASSERT_EQ(cublas->create(&handle), CUBLAS_STATUS_SUCCESS);
  ASSERT_EQ(
      cuda::RouterLogits(handle, GetParam(), bf16 ? static_cast<const void*>(d_xb.ptr) : d_x.ptr,
                         bf16 ? static_cast<const void*>(d_wb.ptr) : d_w.ptr, d_bias.ptr, T, H, E,
                         d_out.ptr),
      CUBLAS_STATUS_SUCCESS);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  cublas->destroy(handle);
  const std::vector<float> got = d_out.Host();
  for (int64_t t = 0; t < T; ++t) {
    for (int e = 0; e < E; ++e) {
      double ref = bias[e];
      for (int64_t h = 0; h < H; ++h) ref += double(x[t * H + h]) * w[e * H + h];
      ASSERT_NEAR(got[t * E + e], ref, 1e-4 * std::max(1.0, std::abs(ref))) << t << "," << e;
    }
  }
}

INSTANTIATE_TEST_SUITE_P(DTypes, CudaRouterLogitsTest,
                         ::testing::Values(cuda::RouterDType::kF32, cuda::RouterDType::kBF16));

}  // namespace
}  // namespace moemesh
