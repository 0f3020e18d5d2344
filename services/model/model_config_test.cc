#include "services/model/model_config.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cstdint>
#include <fstream>
#include <ostream>
#include <string>
#include <vector>

#include "absl/status/status.h"

namespace moemesh {
namespace {

using Json = nlohmann::json;
using ::testing::ElementsAre;
using ::testing::ElementsAreArray;
using ::testing::HasSubstr;

// Tests run from the repository root.
Json FixtureConfig(const std::string& fixture) {
  std::ifstream in("tests/fixtures/" + fixture + "/config.json");
  EXPECT_TRUE(in.good()) << fixture;
  return Json::parse(in, nullptr, /*allow_exceptions=*/false);
}

MoeModelConfig ParseOrDie(const Json& json) {
  absl::StatusOr<MoeModelConfig> c = ParseMoeModelConfig(json);
  EXPECT_TRUE(c.ok()) << c.status();
  return c.ok() ? *c : MoeModelConfig();
}

// Expects ParseMoeModelConfig(json) to fail with INVALID_ARGUMENT mentioning `fragment`.
void ExpectRejected(const Json& json, const std::string& fragment) {
  absl::StatusOr<MoeModelConfig> c = ParseMoeModelConfig(json);
  ASSERT_FALSE(c.ok()) << "accepted: " << json.dump();
  EXPECT_EQ(c.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(c.status().message(), HasSubstr(fragment));
}

struct FixtureExpectation {
  const char* fixture;
  ModelFamily family;
  int64_t hidden, layers, experts, top_k, intermediate, shared_intermediate;
  std::vector<int64_t> moe_layers;
};

void PrintTo(const FixtureExpectation& e, std::ostream* os) { *os << e.fixture; }

class FixtureConfigTest : public ::testing::TestWithParam<FixtureExpectation> {};

TEST_P(FixtureConfigTest, ParsesSizesAndMoeLayers) {
  const FixtureExpectation& want = GetParam();
  const MoeModelConfig c = ParseOrDie(FixtureConfig(want.fixture));
  EXPECT_EQ(c.family, want.family);
  EXPECT_EQ(c.hidden_size, want.hidden);
  EXPECT_EQ(c.num_layers, want.layers);
  EXPECT_EQ(c.num_experts, want.experts);
  EXPECT_EQ(c.top_k, want.top_k);
  EXPECT_EQ(c.expert_intermediate, want.intermediate);
  EXPECT_EQ(c.shared_intermediate, want.shared_intermediate);
  EXPECT_EQ(c.routing.num_experts, want.experts);
  EXPECT_EQ(c.routing.top_k, want.top_k);
  EXPECT_THAT(c.MoeLayers(), ElementsAreArray(want.moe_layers));
  for (int64_t layer : want.moe_layers) EXPECT_TRUE(c.CheckMoeLayer(layer).ok()) << layer;
}

INSTANTIATE_TEST_SUITE_P(
    Fixtures, FixtureConfigTest,
    ::testing::Values(
        FixtureExpectation{"mixtral", ModelFamily::kMixtral, 64, 2, 8, 2, 16, 0, {0, 1}},
        FixtureExpectation{"mixtral_bf16", ModelFamily::kMixtral, 64, 2, 8, 2, 16, 0, {0, 1}},
        FixtureExpectation{"qwen2_moe", ModelFamily::kQwen2Moe, 64, 3, 8, 2, 16, 48, {1, 2}},
        FixtureExpectation{"qwen3_moe", ModelFamily::kQwen3Moe, 64, 2, 8, 4, 16, 0, {0, 1}},
        FixtureExpectation{"qwen3_moe_sharded", ModelFamily::kQwen3Moe, 64, 2, 8, 4, 16, 0, {0, 1}},
        FixtureExpectation{"deepseek_v2", ModelFamily::kDeepseekV2, 64, 2, 16, 4, 16, 32, {1}},
        FixtureExpectation{"deepseek_v3", ModelFamily::kDeepseekV3, 64, 3, 16, 4, 16, 16, {1, 2}},
        FixtureExpectation{"gpt_oss", ModelFamily::kGptOss, 64, 2, 8, 2, 16, 0, {0, 1}},
        FixtureExpectation{
            "deepseek_v3_fp8", ModelFamily::kDeepseekV3, 64, 3, 16, 4, 16, 16, {1, 2}},
        FixtureExpectation{"gpt_oss_mxfp4", ModelFamily::kGptOss, 64, 2, 8, 2, 32, 0, {0, 1}},
        FixtureExpectation{"mixtral_fused", ModelFamily::kMixtral, 64, 2, 8, 2, 16, 0, {0, 1}},
        FixtureExpectation{
            "deepseek_v3_fused", ModelFamily::kDeepseekV3, 64, 3, 16, 4, 16, 16, {1, 2}}),
    [](const auto& info) { return std::string(info.param.fixture); });

TEST(ModelConfigTest, MixtralRouting) {
  const MoeModelConfig c = ParseOrDie(FixtureConfig("mixtral"));
  EXPECT_EQ(c.routing.scoring, Scoring::kSoftmax);
  EXPECT_TRUE(c.routing.normalize);
  EXPECT_EQ(c.routing.num_groups, 1);
  EXPECT_EQ(c.routing.scaling, 1.0f);
  EXPECT_EQ(c.activation, Activation::kSwiGlu);
  EXPECT_FALSE(c.shared_expert_gated);
}

TEST(ModelConfigTest, Qwen2MoeRoutingAndGatedSharedExpert) {
  const MoeModelConfig c = ParseOrDie(FixtureConfig("qwen2_moe"));
  EXPECT_EQ(c.routing.scoring, Scoring::kSoftmax);
  EXPECT_FALSE(c.routing.normalize);
  EXPECT_TRUE(c.shared_expert_gated);
  EXPECT_EQ(c.shared_intermediate, 48);
  EXPECT_THAT(c.mlp_only_layers, ElementsAre(0));
  EXPECT_EQ(c.activation, Activation::kSwiGlu);
}

TEST(ModelConfigTest, Qwen3MoeRouting) {
  const MoeModelConfig c = ParseOrDie(FixtureConfig("qwen3_moe"));
  EXPECT_EQ(c.routing.scoring, Scoring::kSoftmax);
  EXPECT_TRUE(c.routing.normalize);
  EXPECT_EQ(c.routing.normalize_eps, 0.0f);
  EXPECT_FALSE(c.shared_expert_gated);
}

TEST(ModelConfigTest, DeepseekV2Routing) {
  const MoeModelConfig c = ParseOrDie(FixtureConfig("deepseek_v2"));
  EXPECT_EQ(c.routing.scoring, Scoring::kSoftmax);
  EXPECT_EQ(c.routing.group_score, GroupScore::kMax);
  EXPECT_EQ(c.routing.num_groups, 4);
  EXPECT_EQ(c.routing.topk_groups, 2);
  // HF's DeepseekV2 never renormalises, whatever norm_topk_prob says.
  EXPECT_FALSE(c.routing.normalize);
  EXPECT_EQ(c.routing.scaling, 16.0f);
  EXPECT_EQ(c.first_k_dense_replace, 1);
  EXPECT_FALSE(c.shared_expert_gated);
}

TEST(ModelConfigTest, DeepseekV2GreedyHasNoGroups) {
  Json json = FixtureConfig("deepseek_v2");
  json["topk_method"] = "greedy";
  const MoeModelConfig c = ParseOrDie(json);
  EXPECT_EQ(c.routing.num_groups, 1);
}

TEST(ModelConfigTest, DeepseekV3Routing) {
  const MoeModelConfig c = ParseOrDie(FixtureConfig("deepseek_v3"));
  EXPECT_EQ(c.routing.scoring, Scoring::kSigmoid);
  EXPECT_EQ(c.routing.group_score, GroupScore::kTop2Sum);
  EXPECT_EQ(c.routing.num_groups, 4);
  EXPECT_EQ(c.routing.topk_groups, 2);
  EXPECT_TRUE(c.routing.normalize);
  EXPECT_EQ(c.routing.normalize_eps, 1e-20f);
  EXPECT_EQ(c.routing.scaling, 2.5f);
  EXPECT_EQ(c.first_k_dense_replace, 1);
  EXPECT_EQ(c.moe_layer_freq, 1);
}

TEST(ModelConfigTest, GptOssRoutingAndClampedActivation) {
  Json json = FixtureConfig("gpt_oss");
  json["swiglu_limit"] = 5.5;
  const MoeModelConfig c = ParseOrDie(json);
  EXPECT_EQ(c.routing.scoring, Scoring::kSoftmaxOverTopK);
  EXPECT_EQ(c.activation, Activation::kClampedSwiGlu);
  EXPECT_EQ(c.clamp_limit, 5.5f);
  EXPECT_EQ(c.alpha, 1.702f);
}

// Found while writing model_config_fuzzer's invariants: a limit of 1e300 became an
// infinite float and a negative one inverted the clamp, both accepted.
TEST(ModelConfigTest, GptOssSwigluLimitMustBePositiveAndFinite) {
  for (double limit : {0.0, -7.0, 1e300}) {
    Json json = FixtureConfig("gpt_oss");
    json["swiglu_limit"] = limit;
    ExpectRejected(json, "'swiglu_limit' must be positive and finite");
  }
  Json json = FixtureConfig("gpt_oss");
  json["swiglu_limit"] = 3e38;  // still a finite float
  EXPECT_EQ(ParseOrDie(json).clamp_limit, 3e38f);
}

TEST(ModelConfigTest, GptOssIgnoresHiddenAct) {
  Json json = FixtureConfig("gpt_oss");
  json["hidden_act"] = "gelu";
  EXPECT_EQ(ParseOrDie(json).activation, Activation::kClampedSwiGlu);
}

TEST(ModelConfigTest, DeepseekMoeLayerFrequency) {
  Json json = FixtureConfig("deepseek_v3");
  json["num_hidden_layers"] = 6;
  json["first_k_dense_replace"] = 1;
  json["moe_layer_freq"] = 2;
  EXPECT_THAT(ParseOrDie(json).MoeLayers(), ElementsAre(2, 4));
}

TEST(ModelConfigTest, QwenDecoderSparseStepAndMlpOnlyLayers) {
  Json json = FixtureConfig("qwen3_moe");
  json["num_hidden_layers"] = 8;
  json["decoder_sparse_step"] = 2;
  json["mlp_only_layers"] = {3, 5};
  EXPECT_THAT(ParseOrDie(json).MoeLayers(), ElementsAre(1, 7));
}

TEST(ModelConfigTest, CheckMoeLayerNamesDenseAndMissingLayers) {
  const MoeModelConfig qwen2 = ParseOrDie(FixtureConfig("qwen2_moe"));
  absl::Status dense = qwen2.CheckMoeLayer(0);
  EXPECT_EQ(dense.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(dense.message(), HasSubstr("layer 0 is a dense layer"));
  for (int64_t layer : {int64_t{3}, int64_t{-1}, int64_t{1} << 40}) {
    absl::Status missing = qwen2.CheckMoeLayer(layer);
    EXPECT_EQ(missing.code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(missing.message(), HasSubstr("layer " + std::to_string(layer) + " does not exist"));
  }
  const MoeModelConfig deepseek = ParseOrDie(FixtureConfig("deepseek_v3"));
  EXPECT_FALSE(deepseek.IsMoeLayer(0));
  EXPECT_THAT(deepseek.CheckMoeLayer(0).message(), HasSubstr("layer 0 is a dense layer"));
}

TEST(ModelConfigTest, AcceptsEveryExpertCountSpelling) {
  for (const char* key : {"num_local_experts", "num_experts", "n_routed_experts"}) {
    Json json = FixtureConfig("mixtral");
    json.erase("num_local_experts");
    json[key] = 4;
    EXPECT_EQ(ParseOrDie(json).num_experts, 4) << key;
  }
}

TEST(ModelConfigTest, AcceptsEveryTopKSpelling) {
  for (const char* key : {"num_experts_per_tok", "experts_per_token"}) {
    Json json = FixtureConfig("gpt_oss");
    json.erase("num_experts_per_tok");
    json[key] = 3;
    EXPECT_EQ(ParseOrDie(json).top_k, 3) << key;
  }
}

TEST(ModelConfigTest, NullSpellingFallsThroughToTheNext) {
  Json json = FixtureConfig("qwen3_moe");
  json["num_local_experts"] = nullptr;
  EXPECT_EQ(ParseOrDie(json).num_experts, 8);
}

TEST(ModelConfigTest, FamilyNamesRoundTrip) {
  for (ModelFamily f : {ModelFamily::kMixtral, ModelFamily::kQwen2Moe, ModelFamily::kQwen3Moe,
                        ModelFamily::kDeepseekV2, ModelFamily::kDeepseekV3, ModelFamily::kGptOss}) {
    absl::StatusOr<ModelFamily> back = FamilyFromName(FamilyName(f));
    ASSERT_TRUE(back.ok()) << back.status();
    EXPECT_EQ(*back, f);
  }
}

TEST(ModelConfigTest, UnknownModelTypeListsSupportedFamilies) {
  Json json = FixtureConfig("mixtral");
  json["model_type"] = "llama";
  ExpectRejected(json, "'llama'");
  absl::StatusOr<MoeModelConfig> c = ParseMoeModelConfig(json);
  for (const char* family :
       {"mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v2", "deepseek_v3", "gpt_oss"}) {
    EXPECT_THAT(c.status().message(), HasSubstr(family));
  }
}

TEST(ModelConfigTest, ModelTypeMissingOrNotAString) {
  Json json = FixtureConfig("mixtral");
  json.erase("model_type");
  ExpectRejected(json, "model_type");
  json["model_type"] = 7;
  ExpectRejected(json, "model_type");
}

TEST(ModelConfigTest, NotAnObject) {
  ExpectRejected(Json::array({1, 2}), "not a JSON object");
  ExpectRejected(Json("mixtral"), "not a JSON object");
}

struct KeyCase {
  const char* fixture;
  const char* key;
};

void PrintTo(const KeyCase& c, std::ostream* os) { *os << c.fixture << " " << c.key; }

std::string KeyCaseName(const ::testing::TestParamInfo<KeyCase>& info) {
  return std::string(info.param.fixture) + "_" + info.param.key;
}

// Keys each family requires.
const KeyCase kRequiredKeys[] = {
    {"mixtral", "hidden_size"},
    {"mixtral", "num_hidden_layers"},
    {"mixtral", "num_local_experts"},
    {"mixtral", "num_experts_per_tok"},
    {"mixtral", "intermediate_size"},
    {"qwen2_moe", "moe_intermediate_size"},
    {"qwen2_moe", "shared_expert_intermediate_size"},
    {"qwen3_moe", "num_experts"},
    {"qwen3_moe", "moe_intermediate_size"},
    {"deepseek_v2", "moe_intermediate_size"},
    {"deepseek_v2", "n_shared_experts"},
    {"deepseek_v3", "n_routed_experts"},
    {"deepseek_v3", "n_shared_experts"},
    {"gpt_oss", "intermediate_size"},
};

class MissingKeyTest : public ::testing::TestWithParam<KeyCase> {};

TEST_P(MissingKeyTest, ErrorNamesTheKey) {
  Json json = FixtureConfig(GetParam().fixture);
  ASSERT_TRUE(json.contains(GetParam().key));
  json.erase(GetParam().key);
  ExpectRejected(json, "missing '");
  ExpectRejected(json, std::string("'") + GetParam().key + "'");
}

INSTANTIATE_TEST_SUITE_P(All, MissingKeyTest, ::testing::ValuesIn(kRequiredKeys), KeyCaseName);

class WrongTypeTest : public ::testing::TestWithParam<KeyCase> {};

TEST_P(WrongTypeTest, StringWhereIntegerNamesTheKey) {
  Json json = FixtureConfig(GetParam().fixture);
  json[GetParam().key] = "2";
  ExpectRejected(json, std::string("'") + GetParam().key + "' must be an integer");
}

TEST_P(WrongTypeTest, FloatWhereIntegerNamesTheKey) {
  Json json = FixtureConfig(GetParam().fixture);
  json[GetParam().key] = 2.0;
  ExpectRejected(json, std::string("'") + GetParam().key + "' must be an integer");
}

// Every integer key, required or optional: a value of the wrong type is never
// silently replaced by a default.
const KeyCase kIntegerKeys[] = {
    {"mixtral", "hidden_size"},           {"mixtral", "num_hidden_layers"},
    {"mixtral", "num_local_experts"},     {"mixtral", "num_experts_per_tok"},
    {"mixtral", "intermediate_size"},     {"qwen2_moe", "shared_expert_intermediate_size"},
    {"qwen2_moe", "decoder_sparse_step"}, {"qwen3_moe", "moe_intermediate_size"},
    {"deepseek_v3", "n_shared_experts"},  {"deepseek_v3", "first_k_dense_replace"},
    {"deepseek_v3", "moe_layer_freq"},    {"deepseek_v3", "n_group"},
    {"deepseek_v3", "topk_group"},        {"deepseek_v2", "n_group"},
};

INSTANTIATE_TEST_SUITE_P(All, WrongTypeTest, ::testing::ValuesIn(kIntegerKeys), KeyCaseName);

TEST(ModelConfigTest, WrongTypesOfOtherKeysNameTheKey) {
  struct Case {
    const char* fixture;
    const char* key;
    Json value;
  };
  const Case cases[] = {
      {"qwen3_moe", "norm_topk_prob", "yes"},
      {"deepseek_v3", "norm_topk_prob", 1},
      {"deepseek_v3", "routed_scaling_factor", "2.5"},
      {"deepseek_v3", "scoring_func", 1},
      {"deepseek_v2", "topk_method", Json::array()},
      {"mixtral", "hidden_act", 3},
      {"gpt_oss", "swiglu_limit", "7"},
      {"qwen2_moe", "mlp_only_layers", "0"},
      {"qwen2_moe", "mlp_only_layers", Json::array({"0"})},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(std::string(c.fixture) + " " + c.key);
    Json json = FixtureConfig(c.fixture);
    json[c.key] = c.value;
    ExpectRejected(json, std::string("'") + c.key + "'");
  }
}

TEST(ModelConfigTest, NonPositiveSizesNameTheKey) {
  for (const char* key : {"hidden_size", "num_hidden_layers", "num_local_experts",
                          "num_experts_per_tok", "intermediate_size"}) {
    for (int value : {0, -1}) {
      Json json = FixtureConfig("mixtral");
      json[key] = value;
      SCOPED_TRACE(std::string(key) + " = " + std::to_string(value));
      ExpectRejected(json, std::string("'") + key + "' must be positive");
    }
  }
}

TEST(ModelConfigTest, TopKAboveTheExpertCountIsRejected) {
  Json json = FixtureConfig("mixtral");
  json["num_experts_per_tok"] = 9;
  ExpectRejected(json, "num_experts_per_tok");
  // 2^32 + 2 would narrow to a plausible 2 in the int RoutingParams.
  json["num_experts_per_tok"] = (int64_t{1} << 32) + 2;
  ExpectRejected(json, "num_experts_per_tok");
}

TEST(ModelConfigTest, GroupsMustDivideTheExperts) {
  Json json = FixtureConfig("deepseek_v3");
  json["n_group"] = 3;
  json["topk_group"] = 2;
  ExpectRejected(json, "num_groups must divide num_experts");
}

TEST(ModelConfigTest, GroupCountsOutOfRangeAreRejected) {
  struct Case {
    int64_t n_group, topk_group;
  };
  // 2^32 + 4 would narrow to a plausible 4 in the int RoutingParams.
  for (Case c : {Case{(int64_t{1} << 32) + 4, 2}, Case{0, 1}, Case{32, 2}, Case{4, 0}, Case{4, 5},
                 Case{4, (int64_t{1} << 32) + 2}}) {
    SCOPED_TRACE(std::to_string(c.n_group) + ", " + std::to_string(c.topk_group));
    Json json = FixtureConfig("deepseek_v3");
    json["n_group"] = c.n_group;
    json["topk_group"] = c.topk_group;
    ExpectRejected(json, "n_group");
  }
}

TEST(ModelConfigTest, GroupsMustLeaveTopKEligibleExperts) {
  Json json = FixtureConfig("deepseek_v3");
  json["n_group"] = 8;  // 2 experts per group
  json["topk_group"] = 1;
  ExpectRejected(json, "fewer than top_k eligible experts");
}

TEST(ModelConfigTest, AbsurdSizesAreRejected) {
  struct Case {
    const char* fixture;
    const char* key;
    int64_t value;
  };
  const Case cases[] = {
      {"mixtral", "hidden_size", 1000000000000},
      {"mixtral", "intermediate_size", int64_t{1} << 40},
      {"mixtral", "num_local_experts", int64_t{1} << 20},
      {"mixtral", "num_hidden_layers", 1000000},
      {"qwen2_moe", "shared_expert_intermediate_size", int64_t{1} << 40},
      // n_shared_experts · moe_intermediate_size overflows int64.
      {"deepseek_v3", "n_shared_experts", int64_t{1} << 62},
      {"deepseek_v3", "moe_intermediate_size", int64_t{1} << 62},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(std::string(c.fixture) + " " + c.key);
    Json json = FixtureConfig(c.fixture);
    json[c.key] = c.value;
    ExpectRejected(json, "sizes out of range");
  }
  Json json = FixtureConfig("mixtral");
  json["hidden_size"] = 1e12;
  ExpectRejected(json, "'hidden_size' must be an integer");
  json["hidden_size"] = 18446744073709551615u;
  ExpectRejected(json, "hidden_size");
}

TEST(ModelConfigTest, NegativeSharedExpertsAreRejected) {
  Json json = FixtureConfig("deepseek_v2");
  json["n_shared_experts"] = -1;
  ExpectRejected(json, "shared expert size must not be negative");
  json = FixtureConfig("qwen2_moe");
  json["shared_expert_intermediate_size"] = -48;
  ExpectRejected(json, "shared expert size must not be negative");
}

TEST(ModelConfigTest, ZeroSharedExpertIsNotGated) {
  Json json = FixtureConfig("qwen2_moe");
  json["shared_expert_intermediate_size"] = 0;
  const MoeModelConfig c = ParseOrDie(json);
  EXPECT_EQ(c.shared_intermediate, 0);
  EXPECT_FALSE(c.shared_expert_gated);
}

TEST(ModelConfigTest, LayerSelectionParametersAreChecked) {
  Json json = FixtureConfig("qwen3_moe");
  json["decoder_sparse_step"] = 0;
  ExpectRejected(json, "decoder_sparse_step");
  json = FixtureConfig("deepseek_v3");
  json["moe_layer_freq"] = 0;
  ExpectRejected(json, "moe_layer_freq");
  json = FixtureConfig("deepseek_v3");
  json["first_k_dense_replace"] = -1;
  ExpectRejected(json, "first_k_dense_replace");
}

TEST(ModelConfigTest, AModelWithoutMoeLayersIsRejected) {
  Json json = FixtureConfig("qwen3_moe");
  json["mlp_only_layers"] = {0, 1};
  ExpectRejected(json, "no MoE layer");
  json = FixtureConfig("deepseek_v3");
  json["first_k_dense_replace"] = 3;
  ExpectRejected(json, "no MoE layer");
}

TEST(ModelConfigTest, UnsupportedActivationAndRouterVariants) {
  Json json = FixtureConfig("mixtral");
  json["hidden_act"] = "gelu";
  ExpectRejected(json, "hidden_act 'gelu'");
  json["hidden_act"] = "swish";
  EXPECT_TRUE(ParseMoeModelConfig(json).ok());

  json = FixtureConfig("deepseek_v3");
  json["scoring_func"] = "softmax";
  ExpectRejected(json, "scoring_func 'softmax'");
  json = FixtureConfig("deepseek_v2");
  json["scoring_func"] = "sigmoid";
  ExpectRejected(json, "scoring_func 'sigmoid'");
  json = FixtureConfig("deepseek_v2");
  json["topk_method"] = "noaux_tc";
  ExpectRejected(json, "topk_method 'noaux_tc'");
}

TEST(ModelConfigTest, NonFiniteScalingIsRejected) {
  Json json = FixtureConfig("deepseek_v3");
  json["routed_scaling_factor"] = 1e300;  // infinite as a float
  ExpectRejected(json, "scaling must be finite");
}

}  // namespace
}  // namespace moemesh
