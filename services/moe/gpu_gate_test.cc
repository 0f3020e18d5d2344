// Routing on the GPU (GateOptions::gpu, router --device cuda) against the CPU routing for
// every family: the same experts, weights within float rounding, the same dispatch plan
// and probability sums. Skips without a GPU; without one, asking for it must fail
// saying why.
#include "services/cuda/gpu_gate.h"

#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <random>

#include "absl/strings/str_cat.h"
#include "services/cuda/testing.h"
#include "services/model/model_generator.h"
#include "services/moe/moe_gate.h"

namespace moemesh {
namespace {

GeneratedModel Model(ModelFamily family) {
  GenModelOptions o = SmallModelOptions(family, /*seed=*/21);
  o.experts = 16;
  o.top_k = 4;
  o.num_groups = 4;
  o.topk_groups = 2;
  auto m = GenerateAndOpen((std::filesystem::path(::testing::TempDir()) /
                            absl::StrCat("gpu_gate_test_", FamilyName(family)))
                               .string(),
                           o);
  EXPECT_TRUE(m.ok()) << m.status();
  return std::move(m).value();
}

TEST(GpuGateTest, WithoutAGpuItSaysWhy) {
  if (cuda_testing::PluginGpuCount() > 0) {
    GTEST_SKIP() << "a GPU is here: the device cases run instead";
  }
  const GeneratedModel m = Model(ModelFamily::kMixtral);
  GateOptions o;
  o.gpu = 0;
  auto gate = MoeGate::Create(*m.ckpt, m.config, m.config.MoeLayers().back(), o);
  ASSERT_FALSE(gate.ok());
  EXPECT_NE(gate.status().message().find("--device cuda"), std::string::npos) << gate.status();
}

class GpuGateFamilyTest : public ::testing::TestWithParam<ModelFamily> {};

TEST_P(GpuGateFamilyTest, RoutesAsTheCpuDoes) {
  SKIP_WITHOUT_PLUGIN_GPU();
  const GeneratedModel m = Model(GetParam());
  const int64_t layer = m.config.MoeLayers().back(), H = m.config.hidden_size, k = m.config.top_k;
  GateOptions on_gpu;
  on_gpu.gpu = 0;
  auto cpu = MoeGate::Create(*m.ckpt, m.config, layer, {}).value();
  auto gpu = MoeGate::Create(*m.ckpt, m.config, layer, on_gpu).value();
  std::mt19937 rng(7);
  std::normal_distribution<float> nd;
  for (int64_t T : {1, 7, 64, 1000}) {
    SCOPED_TRACE(absl::StrCat("T=", T));
    std::vector<float> x(T * H);
    for (float& v : x) v = nd(rng);
    std::vector<int32_t> ids_c(T * k, -7), ids_g(T * k, -7);
    std::vector<float> w_c(T * k, NAN), w_g(T * k, NAN);
    MoeGate::Workspace ws_c, ws_g;
    ws_c.want_prob_sums = ws_g.want_prob_sums = true;
    cpu->Route(x.data(), T, ids_c.data(), w_c.data(), &ws_c);
    gpu->Route(x.data(), T, ids_g.data(), w_g.data(), &ws_g);
    int differ = 0;
    for (int64_t i = 0; i < T * k; ++i) {
      if (ids_c[i] != ids_g[i]) {
        ++differ;  // a near tie decided the other way by the logits' rounding
        continue;
      }
      EXPECT_NEAR(w_g[i], w_c[i], 1e-4f * std::max(1.0f, std::fabs(w_c[i]))) << "slot " << i;
    }
    EXPECT_LE(differ, std::max<int64_t>(1, T * k / 500)) << "experts chosen differently";
    for (size_t e = 0; e < ws_c.prob_sums.size(); ++e) {
      EXPECT_NEAR(ws_g.prob_sums[e], ws_c.prob_sums[e], 1e-3 * std::max(1.0, ws_c.prob_sums[e]));
    }
    if (differ == 0) {
      EXPECT_EQ(ws_g.plan.expert_offsets, ws_c.plan.expert_offsets);
      EXPECT_EQ(ws_g.plan.token_rows, ws_c.plan.token_rows);
    }
  }
  // Routed on the GPU, every call: a GPU failure would route on the CPU and compare the
  // CPU with itself.
  EXPECT_EQ(gpu->gpu_fallbacks(), 0);
}

INSTANTIATE_TEST_SUITE_P(Families, GpuGateFamilyTest, ::testing::ValuesIn(kAllFamilies),
                         [](const auto& info) { return std::string(FamilyName(info.param)); });

}  // namespace
}  // namespace moemesh
