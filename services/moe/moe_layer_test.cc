#include "services/moe/moe_layer.h"

#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <numeric>
#include <random>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "services/model/checkpoint.h"
#include "services/model/model_generator.h"
#include "services/moe/moe_gate.h"

namespace moemesh {
namespace {

struct Model {
  std::unique_ptr<Checkpoint> ckpt;
  MoeModelConfig config;
};

Model Generate(ModelFamily family, DType dtype = DType::kF32, int64_t experts = 8,
               int64_t top_k = 2) {
  GenModelOptions o;
  o.family = family;
  o.hidden = 48;
  o.intermediate = 24;
  o.shared_intermediate = 24;
  o.experts = experts;
  o.top_k = top_k;
  o.layers = 2;
  o.dtype = dtype;
  o.seed = 11;
  const std::string dir =
      (std::filesystem::path(::testing::TempDir()) /
       absl::StrCat("moe_layer_test_", FamilyName(family), "_", DTypeName(dtype)))
          .string();
  EXPECT_TRUE(GenerateModel(dir, o).ok());
  Model m;
  m.ckpt = Checkpoint::Open(dir).value();
  m.config = ParseMoeModelConfig(m.ckpt->config()).value();
  return m;
}

Tensor RandomInput(int64_t T, int64_t H, uint32_t seed) {
  Tensor x = Tensor::Empty(DType::kF32, {T, H});
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd;
  for (int64_t i = 0; i < x.numel(); ++i) x.mutable_data<float>()[i] = nd(rng);
  return x;
}

// One expert's FFN on one token, through the (separately tested) kernel.
std::vector<float> ExpertOnToken(const Model& m, int64_t layer, int e, const float* x) {
  const ExpertWeights w = LoadExpert(*m.ckpt, m.config, layer, e).value();
  const ExpertFfnWeights v = w.View(m.config);
  std::vector<float> scratch(ExpertFfnScratch(v, 1)), y(m.config.hidden_size);
  ExpertFfn(v, x, 1, scratch.data(), y.data());
  return y;
}

class FamilyTest : public ::testing::TestWithParam<ModelFamily> {};

// Σ_j w_j · expert_{e_j}(x) + shared, recomputed token by token from the layer's own
// routing, must equal the batched, permuted computation.
TEST_P(FamilyTest, BatchedLayerEqualsTokenByTokenSum) {
  Model m = Generate(GetParam(), DType::kBF16);
  const int64_t layer = m.config.MoeLayers().back();
  auto moe = MoeLayer::Create(*m.ckpt, m.config, layer).value();
  const int64_t T = 9, H = m.config.hidden_size, k = m.config.top_k;
  const Tensor x = RandomInput(T, H, 5);
  const MoeLayerOutput out = moe->Forward(x).value();
  auto shared = LoadSharedExperts(*m.ckpt, m.config, layer).value();
  for (int64_t t = 0; t < T; ++t) {
    const float* xt = x.data<float>() + t * H;
    std::vector<double> want(H, 0.0);
    for (int64_t j = 0; j < k; ++j) {
      const int e = out.topk_ids.data<int32_t>()[t * k + j];
      ASSERT_GE(e, 0);
      ASSERT_LT(e, m.config.num_experts);
      const float w = out.topk_weights.data<float>()[t * k + j];
      const std::vector<float> y = ExpertOnToken(m, layer, e, xt);
      for (int64_t h = 0; h < H; ++h) want[h] += double(w) * y[h];
    }
    if (shared) {
      const ExpertFfnWeights v = shared->ffn.View(m.config);
      std::vector<float> scratch(ExpertFfnScratch(v, 1)), y(H);
      ExpertFfn(v, xt, 1, scratch.data(), y.data());
      double gate = 1.0;
      if (shared->gate.raw()) {
        double z = 0;
        for (int64_t h = 0; h < H; ++h) z += double(xt[h]) * shared->gate.data<float>()[h];
        gate = 1.0 / (1.0 + std::exp(-z));
      }
      for (int64_t h = 0; h < H; ++h) want[h] += gate * y[h];
    }
    for (int64_t h = 0; h < H; ++h) {
      ASSERT_NEAR(out.output.data<float>()[t * H + h], want[h], 1e-5 * (1 + std::abs(want[h])))
          << "token " << t << " h " << h;
    }
  }
}

TEST_P(FamilyTest, ConcurrentCallersGetIdenticalBits) {
  Model m = Generate(GetParam());
  auto moe = MoeLayer::Create(*m.ckpt, m.config, m.config.MoeLayers().front()).value();
  const Tensor x = RandomInput(33, m.config.hidden_size, 9);
  const Tensor want = moe->Forward(x).value().output;
  std::vector<std::thread> threads;
  std::atomic<int> mismatches{0};
  for (int i = 0; i < 4; ++i) {
    threads.emplace_back([&] {
      for (int r = 0; r < 5; ++r) {
        const Tensor got = moe->Forward(x).value().output;
        if (std::memcmp(got.raw(), want.raw(), want.nbytes()) != 0) ++mismatches;
      }
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(mismatches.load(), 0);
}

// The load statistics' input: each token's router probabilities (softmax, or sigmoid
// normalised per token), summed per expert; asking for them changes no routing.
TEST_P(FamilyTest, GateSumsRouterProbabilities) {
  Model m = Generate(GetParam());
  const int64_t layer = m.config.MoeLayers().front();
  auto gate = MoeGate::Create(*m.ckpt, m.config, layer).value();
  const int64_t T = 37, H = m.config.hidden_size, E = m.config.num_experts, k = m.config.top_k;
  const Tensor x = RandomInput(T, H, 21);
  std::vector<int32_t> ids(T * k), ids_with(T * k);
  std::vector<float> w(T * k), w_with(T * k);
  MoeGate::Workspace plain, with;
  with.want_prob_sums = true;
  gate->Route(x.data<float>(), T, ids.data(), w.data(), &plain);
  gate->Route(x.data<float>(), T, ids_with.data(), w_with.data(), &with);
  EXPECT_EQ(ids, ids_with);
  EXPECT_EQ(w, w_with);
  EXPECT_TRUE(plain.prob_sums.empty());
  ASSERT_EQ(static_cast<int64_t>(with.prob_sums.size()), E);

  const GateWeights& g = gate->weights();
  std::vector<double> want(E, 0.0);
  for (int64_t t = 0; t < T; ++t) {
    std::vector<double> p(E);
    double sum = 0, max = -1e300;
    for (int64_t e = 0; e < E; ++e) {
      double z = g.bias.raw() ? g.bias.data<float>()[e] : 0.0;
      for (int64_t h = 0; h < H; ++h) {
        z += double(x.data<float>()[t * H + h]) * g.weight.data<float>()[e * H + h];
      }
      p[e] = z;
      max = std::max(max, z);
    }
    const bool sigmoid = m.config.routing.scoring == Scoring::kSigmoid;
    for (int64_t e = 0; e < E; ++e) {
      p[e] = sigmoid ? 1.0 / (1.0 + std::exp(-p[e])) : std::exp(p[e] - max);
      sum += p[e];
    }
    for (int64_t e = 0; e < E; ++e) want[e] += p[e] / sum;
  }
  double total = 0;
  for (int64_t e = 0; e < E; ++e) {
    EXPECT_NEAR(with.prob_sums[e], want[e], 1e-4) << "expert " << e;
    total += with.prob_sums[e];
  }
  EXPECT_NEAR(total, static_cast<double>(T), 1e-3);
}

INSTANTIATE_TEST_SUITE_P(Generated, FamilyTest, ::testing::ValuesIn(kAllFamilies),
                         [](const auto& info) { return std::string(FamilyName(info.param)); });

TEST(MoeLayerTest, CapacityDropsOverflowInTokenOrder) {
  Model m = Generate(ModelFamily::kMixtral, DType::kF32, /*experts=*/4, /*top_k=*/2);
  const int64_t layer = 0, T = 40, H = m.config.hidden_size, k = 2, E = 4;
  MoeLayerOptions options;
  options.capacity_factor = 0.5;  // ceil(0.5·40·2/4) = 10 slots per expert
  auto capped = MoeLayer::Create(*m.ckpt, m.config, layer, options).value();
  const Tensor x = RandomInput(T, H, 21);
  const MoeLayerOutput out = capped->Forward(x).value();
  std::vector<int64_t> admitted(E, 0);
  int64_t dropped = 0;
  for (int64_t t = 0; t < T; ++t) {
    std::vector<double> want(H, 0.0);
    for (int64_t j = 0; j < k; ++j) {
      const int e = out.topk_ids.data<int32_t>()[t * k + j];
      if (admitted[e] == 10) {
        ++dropped;  // contributes zero
        continue;
      }
      ++admitted[e];
      const std::vector<float> y = ExpertOnToken(m, layer, e, x.data<float>() + t * H);
      for (int64_t h = 0; h < H; ++h) want[h] += out.topk_weights.data<float>()[t * k + j] * y[h];
    }
    for (int64_t h = 0; h < H; ++h) {
      ASSERT_NEAR(out.output.data<float>()[t * H + h], want[h], 1e-5 * (1 + std::abs(want[h])))
          << "token " << t;
    }
  }
  EXPECT_GT(dropped, 0) << "the test needs overflow to mean anything";
  EXPECT_EQ(out.dropped, dropped);
  // Dropless by default.
  auto dropless = MoeLayer::Create(*m.ckpt, m.config, layer).value();
  EXPECT_EQ(dropless->Forward(x).value().dropped, 0);
}

// Expert choice against an independent reference: router probabilities in double from
// the gate's own weights, each expert's C best tokens (ties to the lower token), each
// token's output the probability-weighted sum of the experts that took it, and its listed
// experts the first k of those in expert order.
TEST(MoeLayerTest, ExpertChoiceGivesEachExpertItsTopTokens) {
  Model m = Generate(ModelFamily::kMixtral, DType::kF32, 4, 2);
  MoeLayerOptions options;
  options.mode = RoutingMode::kExpertChoice;
  options.capacity_factor = 1.0;  // C = 1.0·T·k/E = 10
  auto moe = MoeLayer::Create(*m.ckpt, m.config, 0, options).value();
  const int64_t T = 20, H = m.config.hidden_size, E = 4, k = 2, C = 10;
  const Tensor x = RandomInput(T, H, 4);
  const MoeLayerOutput out = moe->Forward(x).value();

  const GateWeights gate = LoadGate(*m.ckpt, m.config, 0).value();
  std::vector<double> p(T * E);
  for (int64_t t = 0; t < T; ++t) {
    double mx = -INFINITY, sum = 0;
    for (int64_t e = 0; e < E; ++e) {
      double z = 0;
      for (int64_t h = 0; h < H; ++h) {
        z += double(x.data<float>()[t * H + h]) * gate.weight.data<float>()[e * H + h];
      }
      p[t * E + e] = z;
      mx = std::max(mx, z);
    }
    for (int64_t e = 0; e < E; ++e) sum += std::exp(p[t * E + e] - mx);
    for (int64_t e = 0; e < E; ++e) p[t * E + e] = std::exp(p[t * E + e] - mx) / sum;
  }
  std::vector<std::vector<int>> takers(T);  // experts that took each token, in expert order
  for (int e = 0; e < E; ++e) {
    std::vector<int> order(T);
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(),
                     [&](int a, int b) { return p[a * E + e] > p[b * E + e]; });
    // The reference is exact only away from near ties at the cut.
    ASSERT_GT(p[order[C - 1] * E + e] - p[order[C] * E + e], 1e-5) << "expert " << e;
    for (int i = 0; i < C; ++i) takers[order[i]].push_back(e);
  }
  for (int64_t t = 0; t < T; ++t) {
    std::sort(takers[t].begin(), takers[t].end());
    std::vector<double> want(H, 0.0);
    for (int e : takers[t]) {
      const std::vector<float> y = ExpertOnToken(m, 0, e, x.data<float>() + t * H);
      for (int64_t h = 0; h < H; ++h) want[h] += p[t * E + e] * y[h];
    }
    for (int64_t h = 0; h < H; ++h) {
      ASSERT_NEAR(out.output.data<float>()[t * H + h], want[h], 1e-5 * (1 + std::abs(want[h])))
          << "token " << t;
    }
    for (int64_t j = 0; j < k; ++j) {
      const int32_t id = out.topk_ids.data<int32_t>()[t * k + j];
      const float w = out.topk_weights.data<float>()[t * k + j];
      if (j < static_cast<int64_t>(takers[t].size())) {
        EXPECT_EQ(id, takers[t][j]) << "token " << t << " slot " << j;
        EXPECT_NEAR(w, p[t * E + takers[t][j]], 1e-6) << "token " << t << " slot " << j;
      } else {
        EXPECT_EQ(id, -1) << "token " << t << " slot " << j;
        EXPECT_EQ(w, 0.0f);
      }
    }
  }
}

TEST(MoeLayerTest, RejectsBadInputsWithClearErrors) {
  Model m = Generate(ModelFamily::kQwen3Moe);
  auto moe = MoeLayer::Create(*m.ckpt, m.config, 0).value();
  const int64_t H = m.config.hidden_size;
  auto expect_error = [&](const Tensor& x, const std::string& needle) {
    auto out = moe->Forward(x);
    ASSERT_FALSE(out.ok());
    EXPECT_EQ(out.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_NE(out.status().message().find(needle), absl::string_view::npos) << out.status();
  };
  expect_error(Tensor::Zeros(DType::kF32, {4, H + 1}), "expected [T, 48]");
  expect_error(Tensor::Zeros(DType::kF32, {2, 4, H}), "has shape [2, 4, 48]");
  expect_error(Tensor::Zeros(DType::kF32, {0, H}), "T = 0");
  expect_error(Tensor::Zeros(DType::kI32, {4, H}), "dtype I32");
  // The layer still works after the bad calls.
  EXPECT_TRUE(moe->Forward(Tensor::Zeros(DType::kF32, {4, H})).ok());
  // Non-MoE and missing layers.
  EXPECT_FALSE(MoeLayer::Create(*m.ckpt, m.config, 2).ok());
  MoeLayerOptions bad;
  bad.capacity_factor = -1;
  EXPECT_FALSE(MoeLayer::Create(*m.ckpt, m.config, 0, bad).ok());
}

// A token that is not a number gets the lowest expert ids (NaN is -inf in the choice, on
// every device) and a NaN output, and leaves the other tokens' answers as they are.
TEST(MoeLayerTest, NonFiniteTokensAreRoutedPredictablyAndPoisonNoOther) {
  Model m = Generate(ModelFamily::kDeepseekV3);
  auto moe = MoeLayer::Create(*m.ckpt, m.config, 1).value();
  const int64_t H = m.config.hidden_size, k = m.config.top_k;
  Tensor x = RandomInput(3, H, 1);
  const Tensor clean = RandomInput(3, H, 1);
  x.mutable_data<float>()[0] = NAN;       // token 0
  x.mutable_data<float>()[H] = INFINITY;  // token 1
  auto out = moe->Forward(x);
  ASSERT_TRUE(out.ok()) << out.status();
  for (int64_t j = 0; j < k; ++j) EXPECT_EQ(out->topk_ids.data<int32_t>()[j], j);
  for (int64_t h = 0; h < H; ++h) EXPECT_TRUE(std::isnan(out->output.data<float>()[h])) << h;
  for (int64_t i = 0; i < out->topk_ids.numel(); ++i) {
    EXPECT_GE(out->topk_ids.data<int32_t>()[i], 0);
    EXPECT_LT(out->topk_ids.data<int32_t>()[i], m.config.num_experts);
  }
  // Token 2 as in a batch of finite tokens: the same experts and weights, the same output
  // (within the rounding of the batch's other GEMM shapes).
  const MoeLayerOutput want = moe->Forward(clean).value();
  for (int64_t j = 0; j < k; ++j) {
    EXPECT_EQ(out->topk_ids.data<int32_t>()[2 * k + j], want.topk_ids.data<int32_t>()[2 * k + j]);
    EXPECT_EQ(out->topk_weights.data<float>()[2 * k + j],
              want.topk_weights.data<float>()[2 * k + j]);
  }
  for (int64_t h = 0; h < H; ++h) {
    const float w = want.output.data<float>()[2 * H + h];
    EXPECT_NEAR(out->output.data<float>()[2 * H + h], w, 1e-5f * (1 + std::abs(w))) << h;
  }
}

}  // namespace
}  // namespace moemesh
