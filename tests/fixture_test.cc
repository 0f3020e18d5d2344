// Every family's MoeLayer against reference outputs that python/make_reference_fixtures.py
// computed with PyTorch, following Hugging Face's modeling code (committed fixtures in
// tests/fixtures/<case>/, so torch is not needed here).
#include <gtest/gtest.h>

#include <cmath>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "services/model/checkpoint.h"
#include "services/model/model_config.h"
#include "services/model/safetensors.h"
#include "services/moe/moe_layer.h"

namespace moemesh {
namespace {

const std::string kFixtures = "tests/fixtures/";

double RelativeError(const Tensor& got, const Tensor& want) {
  const Tensor g = got.ToF32().value(), w = want.ToF32().value();
  double err = 0, norm = 0;
  for (int64_t i = 0; i < g.numel(); ++i) {
    const double d = double(g.data<float>()[i]) - w.data<float>()[i];
    err += d * d;
    norm += double(w.data<float>()[i]) * w.data<float>()[i];
  }
  return std::sqrt(err / norm);
}

struct Loaded {
  std::unique_ptr<Checkpoint> ckpt;
  MoeModelConfig config;
};

Loaded Load(const std::string& name) {
  Loaded l;
  auto ckpt = Checkpoint::Open(kFixtures + name);
  EXPECT_TRUE(ckpt.ok()) << ckpt.status();
  l.ckpt = std::move(*ckpt);
  auto config = ParseMoeModelConfig(l.ckpt->config());
  EXPECT_TRUE(config.ok()) << config.status();
  l.config = *config;
  return l;
}

class FixtureTest : public ::testing::TestWithParam<std::string> {};

TEST_P(FixtureTest, EveryMoeLayerMatchesPyTorchReference) {
  const std::string name = GetParam();
  Loaded m = Load(name);
  auto input = SafetensorsFile::Open(kFixtures + name + "/input.safetensors");
  auto expected = SafetensorsFile::Open(kFixtures + name + "/expected.safetensors");
  ASSERT_TRUE(input.ok() && expected.ok());
  const Tensor x = (*input)->Get("hidden_states").value();
  const std::vector<int64_t> layers = m.config.MoeLayers();
  ASSERT_FALSE(layers.empty());
  for (int64_t layer : layers) {
    SCOPED_TRACE(absl::StrCat(name, " layer ", layer));
    auto moe = MoeLayer::Create(*m.ckpt, m.config, layer);
    ASSERT_TRUE(moe.ok()) << moe.status();
    auto out = (*moe)->Forward(x);
    ASSERT_TRUE(out.ok()) << out.status();
    const Tensor want = (*expected)->Get(absl::StrCat("output.", layer)).value();
    const Tensor want_ids = (*expected)->Get(absl::StrCat("topk_ids.", layer)).value();
    const Tensor want_w = (*expected)->Get(absl::StrCat("topk_weights.", layer)).value();
    ASSERT_EQ(out->output.shape(), want.shape());
    ASSERT_EQ(out->output.dtype(), DType::kF32);
    EXPECT_LE(RelativeError(out->output, want), 1e-5);
    ASSERT_EQ(out->topk_ids.shape(), want_ids.shape());
    for (int64_t i = 0; i < want_ids.numel(); ++i) {
      ASSERT_EQ(out->topk_ids.data<int32_t>()[i], want_ids.data<int32_t>()[i]) << "slot " << i;
      ASSERT_NEAR(out->topk_weights.data<float>()[i], want_w.data<float>()[i],
                  1e-5 * std::max(1.0f, std::abs(want_w.data<float>()[i])))
          << "slot " << i;
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Families, FixtureTest,
                         ::testing::Values("mixtral", "mixtral_bf16", "qwen2_moe", "qwen3_moe",
                                           "qwen3_moe_sharded", "deepseek_v3", "deepseek_v2",
                                           "gpt_oss", "deepseek_v3_fp8", "gpt_oss_mxfp4",
                                           "mixtral_fused", "deepseek_v3_fused"));

TEST(FixtureTest, Bf16InputGivesBf16OutputOfTheSameMath) {
  Loaded m = Load("mixtral_bf16");
  auto input = SafetensorsFile::Open(kFixtures + "mixtral_bf16/input_bf16.safetensors");
  auto expected = SafetensorsFile::Open(kFixtures + "mixtral_bf16/expected_bf16_input.safetensors");
  ASSERT_TRUE(input.ok() && expected.ok());
  const Tensor x = (*input)->Get("hidden_states").value();
  ASSERT_EQ(x.dtype(), DType::kBF16);
  for (int64_t layer : m.config.MoeLayers()) {
    auto moe = MoeLayer::Create(*m.ckpt, m.config, layer).value();
    const Tensor want = (*expected)->Get(absl::StrCat("output.", layer)).value();
    // The float32 core on the widened input matches to float32 precision ...
    auto f32 = moe->Forward(x.ToF32().value());
    ASSERT_TRUE(f32.ok());
    EXPECT_LE(RelativeError(f32->output, want), 1e-5);
    // ... and the BF16 path returns BF16 whose only error is the final rounding.
    auto bf16 = moe->Forward(x);
    ASSERT_TRUE(bf16.ok());
    ASSERT_EQ(bf16->output.dtype(), DType::kBF16);
    const Tensor rounded = f32->output.FromF32(DType::kBF16).value();
    ASSERT_EQ(std::memcmp(bf16->output.raw(), rounded.raw(), rounded.nbytes()), 0);
    EXPECT_LE(RelativeError(bf16->output, want), 4e-3);
  }
}

TEST(FixtureTest, ShardedCheckpointEqualsSingleFile) {
  Loaded sharded = Load("qwen3_moe_sharded");
  Loaded single = Load("qwen3_moe");
  EXPECT_EQ(sharded.config.num_experts, single.config.num_experts);
  auto input = SafetensorsFile::Open(kFixtures + "qwen3_moe/input.safetensors");
  const Tensor x = (*input)->Get("hidden_states").value();
  for (int64_t layer : single.config.MoeLayers()) {
    auto a = MoeLayer::Create(*sharded.ckpt, sharded.config, layer).value()->Forward(x).value();
    auto b = MoeLayer::Create(*single.ckpt, single.config, layer).value()->Forward(x).value();
    // Same math on F32 vs exactly-widened F16 weights of equal value: identical bits.
    EXPECT_EQ(std::memcmp(a.output.raw(), b.output.raw(), a.output.nbytes()), 0);
  }
}

}  // namespace
}  // namespace moemesh
