#include "kernels/cpu/expert_ffn.h"

#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <vector>

namespace moemesh {
namespace {

// Straightforward double-precision reference of ExpertFfn.
std::vector<double> Reference(const ExpertFfnWeights& w, const std::vector<float>& x,
                              int64_t rows) {
  const int64_t H = w.hidden, I = w.intermediate, C = w.first_gemm_cols();
  std::vector<double> y(rows * H);
  for (int64_t r = 0; r < rows; ++r) {
    std::vector<double> gu(C), h(I);
    for (int64_t c = 0; c < C; ++c) {
      double acc = w.gate_up_bias ? w.gate_up_bias[c] : 0.0;
      for (int64_t i = 0; i < H; ++i) acc += double(x[r * H + i]) * w.gate_up[c * H + i];
      gu[c] = acc;
    }
    for (int64_t i = 0; i < I; ++i) {
      switch (w.activation) {
        case Activation::kSwiGlu: {
          const double g = gu[i];
          h[i] = g / (1 + std::exp(-g)) * gu[I + i];
          break;
        }
        case Activation::kClampedSwiGlu: {
          const double g = std::min<double>(gu[i], w.clamp_limit);
          const double u = std::clamp<double>(gu[I + i], -w.clamp_limit, w.clamp_limit);
          h[i] = (u + 1) * g / (1 + std::exp(-w.alpha * g));
          break;
        }
        case Activation::kRelu:
          h[i] = std::max(0.0, gu[i]);
          break;
      }
    }
    for (int64_t o = 0; o < H; ++o) {
      double acc = w.down_bias ? w.down_bias[o] : 0.0;
      for (int64_t i = 0; i < I; ++i) acc += h[i] * w.down[o * I + i];
      y[r * H + o] = acc;
    }
  }
  return y;
}

struct FfnCase {
  Activation act;
  bool bias;
  int64_t rows;
};

class ExpertFfnTest : public ::testing::TestWithParam<FfnCase> {};

TEST_P(ExpertFfnTest, MatchesReference) {
  const FfnCase c = GetParam();
  const int64_t H = 48, I = 40;
  ExpertFfnWeights w;
  w.hidden = H;
  w.intermediate = I;
  w.activation = c.act;
  const int64_t C = w.first_gemm_cols();
  std::mt19937 rng(static_cast<uint32_t>(c.rows) * 7 + static_cast<uint32_t>(c.act));
  std::normal_distribution<float> nd(0.0f, 1.0f);
  auto fill = [&](std::vector<float>& v, float scale) {
    for (float& f : v) f = nd(rng) * scale;
  };
  // Scaled so that activations reach the clamp (±7) for the GPT-OSS case.
  std::vector<float> gu(C * H), gub(C), down(H * I), downb(H), x(c.rows * H);
  fill(gu, 1.5f / std::sqrt(float(H)) * 3);
  fill(gub, 0.5f);
  fill(down, 1.0f / std::sqrt(float(I)));
  fill(downb, 0.5f);
  fill(x, 1.0f);
  w.gate_up = gu.data();
  w.down = down.data();
  if (c.bias) {
    w.gate_up_bias = gub.data();
    w.down_bias = downb.data();
  }
  std::vector<float> scratch(ExpertFfnScratch(w, c.rows), NAN), y(c.rows * H, NAN);
  ExpertFfn(w, x.data(), c.rows, scratch.data(), y.data());
  const std::vector<double> ref = Reference(w, x, c.rows);
  double err = 0, norm = 0;
  for (size_t i = 0; i < y.size(); ++i) {
    ASSERT_TRUE(std::isfinite(y[i]));
    err += (y[i] - ref[i]) * (y[i] - ref[i]);
    norm += ref[i] * ref[i];
  }
  EXPECT_LE(std::sqrt(err / std::max(norm, 1e-30)), 1e-6);
}

INSTANTIATE_TEST_SUITE_P(
    Activations, ExpertFfnTest,
    ::testing::Values(FfnCase{Activation::kSwiGlu, false, 1}, FfnCase{Activation::kSwiGlu, false, 37},
                      FfnCase{Activation::kSwiGlu, true, 5},
                      FfnCase{Activation::kClampedSwiGlu, true, 1},
                      FfnCase{Activation::kClampedSwiGlu, true, 64},
                      FfnCase{Activation::kClampedSwiGlu, false, 9},
                      FfnCase{Activation::kRelu, false, 12}, FfnCase{Activation::kRelu, true, 3}));

TEST(ExpertFfnTest, ZeroRowsTouchesNothing) {
  ExpertFfnWeights w;
  w.hidden = 4;
  w.intermediate = 4;
  float y = 42.0f;
  ExpertFfn(w, nullptr, 0, nullptr, &y);
  EXPECT_EQ(y, 42.0f);
}

TEST(ExpertFfnTest, SiluAccurateOverWideRange) {
  // One row, I values spanning [-100, 100]; up = 1 so h = silu(g).
  ExpertFfnWeights w;
  const int64_t I = 2001;
  w.intermediate = I;
  std::vector<float> row(2 * I);
  for (int64_t i = 0; i < I; ++i) {
    row[i] = -100.0f + 0.1f * float(i);
    row[I + i] = 1.0f;
  }
  std::vector<float> g(row.begin(), row.begin() + I);
  ApplyActivation(w, row.data(), 1, 2 * I);
  for (int64_t i = 0; i < I; ++i) {
    const double ref = double(g[i]) / (1.0 + std::exp(-double(g[i])));
    ASSERT_NEAR(row[i], ref, 4e-7 * std::max(1.0, std::abs(ref))) << g[i];
  }
}

}  // namespace
}  // namespace moemesh
