// The grouped expert FFN on the GPU against a double-precision product of the same
// BF16 values: gate/up + activation (h, stored BF16) and down (from the GPU's own h), for
// both gated activations, with and without biases, experts with no rows and with rows
// over several tiles. Fresh random inputs, poisoned outputs. Skips without a CUDA device.
#include "kernels/cuda/grouped_ffn.cuh"

#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <random>
#include <vector>

#include "kernels/cuda/testing.h"
#include "kernels/dtype.h"

namespace moemesh {
namespace {

using cuda_testing::Download;
using cuda_testing::Poisoned;
using cuda_testing::Upload;

// Random BF16 values: the bits, and the floats they are.
void RandomBf16(std::mt19937& rng, float scale, std::vector<uint16_t>* bits,
                std::vector<float>* values) {
  std::normal_distribution<float> nd(0.0f, scale);
  for (size_t i = 0; i < bits->size(); ++i) {
    (*bits)[i] = F32ToBf16(nd(rng));
    (*values)[i] = Bf16ToF32((*bits)[i]);
  }
}

double Act(Activation a, double g, double u, double limit, double alpha) {
  if (a == Activation::kClampedSwiGlu) {
    g = std::min(g, limit);
    u = std::clamp(u, -limit, limit);
    return (u + 1.0) * g / (1.0 + std::exp(-alpha * g));
  }
  return g / (1.0 + std::exp(-g)) * u;
}

struct Case {
  const char* name;
  int E;
  int64_t H, I;
  std::vector<int64_t> rows_per_expert;
  Activation activation;
  bool biases;
};

class CudaGroupedFfnTest : public ::testing::TestWithParam<Case> {};

TEST_P(CudaGroupedFfnTest, MatchesADoubleProductOfTheSameBf16Values) {
  SKIP_WITHOUT_GPU();
  const Case& c = GetParam();
  const int E = c.E;
  const int64_t H = c.H, I = c.I;
  std::vector<int64_t> offsets(E + 1, 0);
  for (int e = 0; e < E; ++e) offsets[e + 1] = offsets[e] + c.rows_per_expert[e];
  const int64_t rows = offsets[E];
  std::mt19937 rng(static_cast<uint32_t>(H * 7 + I + rows));
  std::vector<uint16_t> xb(rows * H), gub(E * 2 * I * H), db(E * H * I);
  std::vector<float> x(xb.size()), gu(gub.size()), down(db.size());
  RandomBf16(rng, 1.0f, &xb, &x);
  RandomBf16(rng, 1.0f / std::sqrt(float(H)), &gub, &gu);
  RandomBf16(rng, 1.0f / std::sqrt(float(I)), &db, &down);
  std::vector<float> gu_bias(E * 2 * I), down_bias(E * H);
  std::normal_distribution<float> nd(0.0f, 0.1f);
  for (float& v : gu_bias) v = nd(rng);
  for (float& v : down_bias) v = nd(rng);

  cuda::GroupedFfnWeights w;
  w.num_experts = E;
  w.hidden = H;
  w.intermediate = I;
  w.activation = c.activation;
  uint16_t* d_gu = Upload(gub);
  uint16_t* d_down = Upload(db);
  float* d_gub = Upload(gu_bias);
  float* d_db = Upload(down_bias);
  w.gate_up = d_gu;
  w.down = d_down;
  w.gate_up_bias = c.biases ? d_gub : nullptr;
  w.down_bias = c.biases ? d_db : nullptr;
  uint16_t* d_x = Upload(xb);
  int64_t* d_off = Upload(offsets);
  uint16_t* d_h = Poisoned<uint16_t>(rows * I);
  float* d_y = Poisoned<float>(rows * H);
  ASSERT_EQ(cuda::GroupedGateUpAct(w, d_x, d_off, rows, d_h, nullptr), cudaSuccess);
  ASSERT_EQ(cuda::GroupedDown(w, d_h, d_off, rows, d_y, nullptr), cudaSuccess);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  const std::vector<uint16_t> hb = Download(d_h, rows * I);
  const std::vector<float> y = Download(d_y, rows * H);

  for (int e = 0; e < E; ++e) {
    for (int64_t r = offsets[e]; r < offsets[e + 1]; ++r) {
      for (int64_t i = 0; i < I; ++i) {
        double g = c.biases ? gu_bias[e * 2 * I + i] : 0.0,
               u = c.biases ? gu_bias[e * 2 * I + I + i] : 0.0;
        for (int64_t k = 0; k < H; ++k) {
          g += double(x[r * H + k]) * gu[(e * 2 * I + i) * H + k];
          u += double(x[r * H + k]) * gu[(e * 2 * I + I + i) * H + k];
        }
        const double ref = Act(c.activation, g, u, w.clamp_limit, w.alpha);
        const double got = Bf16ToF32(hb[r * I + i]);
        ASSERT_NEAR(got, ref, 1e-2 * std::max(1.0, std::abs(ref)))
            << c.name << " h row " << r << " col " << i;
      }
      for (int64_t col = 0; col < H; ++col) {
        double ref = c.biases ? down_bias[e * H + col] : 0.0;
        for (int64_t i = 0; i < I; ++i)
          ref += double(Bf16ToF32(hb[r * I + i])) * down[(e * H + col) * I + i];
        ASSERT_NEAR(y[r * H + col], ref, 1e-3 * std::max(1.0, std::abs(ref)))
            << c.name << " y row " << r << " col " << col;
      }
    }
  }
  for (void* p : {static_cast<void*>(d_gu), static_cast<void*>(d_down), static_cast<void*>(d_gub),
                  static_cast<void*>(d_db), static_cast<void*>(d_x), static_cast<void*>(d_off),
                  static_cast<void*>(d_h), static_cast<void*>(d_y)}) {
    cudaFree(p);
  }
}

TEST(CudaGroupedFfnTest, RefusesShapesItDoesNotTake) {
  cuda::GroupedFfnWeights w;
  w.num_experts = 2;
  w.hidden = 100;  // not a multiple of 16
  w.intermediate = 64;
  EXPECT_EQ(cuda::GroupedGateUpAct(w, nullptr, nullptr, 4, nullptr, nullptr),
            cudaErrorInvalidValue);
  w.hidden = 64;
  w.activation = Activation::kRelu;  // not gated
  EXPECT_EQ(cuda::GroupedDown(w, nullptr, nullptr, 4, nullptr, nullptr), cudaErrorInvalidValue);
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, CudaGroupedFfnTest,
    ::testing::Values(
        Case{"swiglu", 4, 128, 96, {3, 0, 70, 1}, Activation::kSwiGlu, false},
        Case{"swiglu_one_row", 8, 256, 64, {0, 0, 1, 0, 0, 0, 0, 0}, Activation::kSwiGlu, false},
        Case{"gpt_oss_clamped", 4, 288, 160, {17, 64, 65, 2}, Activation::kClampedSwiGlu, true},
        Case{"wide_rows", 2, 512, 1024, {129, 200}, Activation::kSwiGlu, true},
        // H and I = 16 (mod 32): the last tile of each stage half full.
        Case{"half_tiles", 3, 144, 80, {5, 33, 0}, Activation::kSwiGlu, false},
        Case{"half_tiles_clamped", 2, 208, 336, {64, 1}, Activation::kClampedSwiGlu, true}),
    [](const auto& info) { return std::string(info.param.name); });

}  // namespace
}  // namespace moemesh
