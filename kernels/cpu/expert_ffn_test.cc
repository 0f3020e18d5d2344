#include "kernels/cpu/expert_ffn.h"

#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <random>
#include <vector>

namespace moemesh {
namespace {

// Straightforward double-precision reference of ExpertFfn.
std::vector<double> Reference(const ExpertFfnWeights& w, const std::vector<float>& x,
                              int64_t rows) {
  const int64_t H = w.hidden, I = w.intermediate, C = w.gate_up_rows();
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
  const int64_t H = 700,
                I = 600;  // 10 packed blocks: 2 gate/up tasks (the last partial); 2 down tasks
  ExpertFfnWeights w;
  w.hidden = H;
  w.intermediate = I;
  w.activation = c.act;
  const int64_t C = w.gate_up_rows();
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
  // The reference reads the stacked layout; the kernel the packed one.
  ExpertFfnWeights stacked = w;
  stacked.gate_up = gu.data();
  stacked.down = down.data();
  if (c.bias) {
    stacked.gate_up_bias = gub.data();
    stacked.down_bias = downb.data();
  }
  const std::vector<double> ref = Reference(stacked, x, c.rows);
  std::vector<float> packed(gu.size()), packed_bias(gub.size());
  PackGateUp(gu.data(), I, H, w.gated(), packed.data());
  PackGateUp(gub.data(), I, 1, w.gated(), packed_bias.data());
  w.gate_up = packed.data();
  w.down = down.data();
  if (c.bias) {
    w.gate_up_bias = packed_bias.data();
    w.down_bias = downb.data();
  }
  std::vector<float> scratch(ExpertFfnScratch(w, c.rows), NAN), y(c.rows * H, NAN);
  ExpertFfn(w, x.data(), c.rows, scratch.data(), y.data());
  double err = 0, norm = 0;
  for (size_t i = 0; i < y.size(); ++i) {
    ASSERT_TRUE(std::isfinite(y[i]));
    err += (y[i] - ref[i]) * (y[i] - ref[i]);
    norm += ref[i] * ref[i];
  }
  EXPECT_LE(std::sqrt(err / std::max(norm, 1e-30)), 1e-6);

  // The canonical tasks, run in reverse order, are bit-identical to the one-call FFN:
  // a parallel layer (or a remote expert service) must not change answers.
  std::vector<float> gu_buf(GateUpScratch(w, c.rows)), h(HiddenScratch(w, c.rows)),
      y2(c.rows * H, NAN);
  for (int64_t t = NumGateUpTasks(w) - 1; t >= 0; --t) {
    ExpertGateUpTask(w, x.data(), c.rows, t, gu_buf.data(), h.data());
  }
  for (int64_t t = NumDownTasks(w) - 1; t >= 0; --t)
    ExpertDownTask(w, h.data(), c.rows, t, y2.data());
  EXPECT_EQ(std::memcmp(y.data(), y2.data(), y.size() * sizeof(float)), 0);

  // Any other split agrees to rounding.
  std::vector<float> y3(c.rows * H, NAN);
  for (int64_t b = 0; b < w.num_blocks(); ++b) {
    ExpertGateUpAct(w, x.data(), c.rows, b, b + 1, gu_buf.data(), h.data());
  }
  ExpertDown(w, h.data(), c.rows, 17, H, y3.data());
  ExpertDown(w, h.data(), c.rows, 0, 17, y3.data());
  double diff = 0, ynorm = 0;
  for (size_t i = 0; i < y.size(); ++i) {
    diff += (double(y3[i]) - y[i]) * (double(y3[i]) - y[i]);
    ynorm += double(y[i]) * y[i];
  }
  EXPECT_LE(std::sqrt(diff / std::max(ynorm, 1e-30)), 1e-6);
}

INSTANTIATE_TEST_SUITE_P(Activations, ExpertFfnTest,
                         ::testing::Values(FfnCase{Activation::kSwiGlu, false, 1},
                                           FfnCase{Activation::kSwiGlu, false, 37},
                                           FfnCase{Activation::kSwiGlu, true, 5},
                                           FfnCase{Activation::kClampedSwiGlu, true, 1},
                                           FfnCase{Activation::kClampedSwiGlu, true, 64},
                                           FfnCase{Activation::kClampedSwiGlu, false, 9},
                                           FfnCase{Activation::kRelu, false, 12},
                                           FfnCase{Activation::kRelu, true, 3}));

// PackedGateUpRow inverts PackGateUp's row order, for sizes below, at and across the
// 64-row blocks.
TEST(ExpertFfnTest, PackedGateUpRowFindsEveryStackedRow) {
  for (int64_t I : {1, 16, 48, 63, 64, 65, 130, 192}) {
    std::vector<float> stacked(2 * I), packed(2 * I, -1.0f);
    for (int64_t r = 0; r < 2 * I; ++r) stacked[r] = static_cast<float>(r);
    PackGateUp(stacked.data(), I, 1, true, packed.data());
    std::vector<bool> seen(2 * I, false);
    for (int64_t r = 0; r < 2 * I; ++r) {
      const int64_t p = PackedGateUpRow(r, I);
      ASSERT_GE(p, 0) << "I=" << I << " r=" << r;
      ASSERT_LT(p, 2 * I) << "I=" << I << " r=" << r;
      EXPECT_EQ(packed[p], stacked[r]) << "I=" << I << " r=" << r;
      EXPECT_FALSE(seen[p]) << "I=" << I << ": packed row " << p << " found twice";
      seen[p] = true;
    }
  }
}

TEST(ExpertFfnTest, ZeroRowsTouchesNothing) {
  ExpertFfnWeights w;
  w.hidden = 4;
  w.intermediate = 4;
  float y = 42.0f;
  ExpertFfn(w, nullptr, 0, nullptr, &y);
  EXPECT_EQ(y, 42.0f);
}

TEST(ExpertFfnTest, SiluAccurateOverWideRange) {
  // Identity-like weights: H = I = 64, gate rows pick x, up rows are zero with bias 1,
  // so h = silu(x); then down = identity returns it.
  const int64_t n = 64;
  ExpertFfnWeights w;
  w.hidden = n;
  w.intermediate = n;
  std::vector<float> stacked(2 * n * n, 0.0f), bias(2 * n, 0.0f), down(n * n, 0.0f);
  for (int64_t i = 0; i < n; ++i) {
    stacked[i * n + i] = 1.0f;
    down[i * n + i] = 1.0f;
    bias[n + i] = 1.0f;
  }
  std::vector<float> packed(stacked.size()), packed_bias(bias.size());
  PackGateUp(stacked.data(), n, n, true, packed.data());
  PackGateUp(bias.data(), n, 1, true, packed_bias.data());
  w.gate_up = packed.data();
  w.gate_up_bias = packed_bias.data();
  w.down = down.data();
  std::vector<float> scratch(ExpertFfnScratch(w, 1)), x(n), y(n);
  for (float start = -100.0f; start < 100.0f; start += 0.1f * n) {
    for (int64_t i = 0; i < n; ++i) x[i] = start + 0.1f * float(i);
    ExpertFfn(w, x.data(), 1, scratch.data(), y.data());
    for (int64_t i = 0; i < n; ++i) {
      const double ref = double(x[i]) / (1.0 + std::exp(-double(x[i])));
      ASSERT_NEAR(y[i], ref, 4e-7 * std::max(1.0, std::abs(ref))) << x[i];
    }
  }
}

}  // namespace
}  // namespace moemesh
