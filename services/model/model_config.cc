#include "services/model/model_config.h"

#include <algorithm>
#include <initializer_list>
#include <limits>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/string_view.h"
#include "services/base/status_macros.h"

namespace moemesh {
namespace {

using Json = nlohmann::json;

constexpr std::pair<ModelFamily, const char*> kFamilies[] = {
    {ModelFamily::kMixtral, "mixtral"},        {ModelFamily::kQwen2Moe, "qwen2_moe"},
    {ModelFamily::kQwen3Moe, "qwen3_moe"},     {ModelFamily::kDeepseekV2, "deepseek_v2"},
    {ModelFamily::kDeepseekV3, "deepseek_v3"}, {ModelFamily::kGptOss, "gpt_oss"},
};

// Reads config keys with a family's context for messages.
class ConfigReader {
 public:
  ConfigReader(const Json& json, absl::string_view model_type)
      : json_(json), model_type_(model_type) {}

  // The first present spelling, as an integer; error when none is present.
  absl::StatusOr<int64_t> Int(std::initializer_list<absl::string_view> keys) const {
    for (absl::string_view k : keys) {
      auto it = json_.find(std::string(k));
      if (it == json_.end() || it->is_null()) continue;
      if (!it->is_number_integer()) {
        return absl::InvalidArgumentError(absl::StrCat(
            "config.json: '", k, "' must be an integer (model_type ", model_type_, ")"));
      }
      return it->get<int64_t>();
    }
    return Missing(keys);
  }
  absl::StatusOr<int64_t> Positive(std::initializer_list<absl::string_view> keys) const {
    ASSIGN_OR_RETURN(int64_t v, Int(keys));
    if (v <= 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("config.json: '", *keys.begin(), "' must be positive, got ", v));
    }
    return v;
  }
  absl::StatusOr<int64_t> IntOr(absl::string_view key, int64_t fallback) const {
    auto it = json_.find(std::string(key));
    if (it == json_.end() || it->is_null()) return fallback;
    return Int({key});
  }
  absl::StatusOr<double> NumberOr(absl::string_view key, double fallback) const {
    auto it = json_.find(std::string(key));
    if (it == json_.end() || it->is_null()) return fallback;
    if (!it->is_number()) {
      return absl::InvalidArgumentError(absl::StrCat("config.json: '", key, "' must be a number"));
    }
    return it->get<double>();
  }
  absl::StatusOr<bool> BoolOr(absl::string_view key, bool fallback) const {
    auto it = json_.find(std::string(key));
    if (it == json_.end() || it->is_null()) return fallback;
    if (!it->is_boolean()) {
      return absl::InvalidArgumentError(absl::StrCat("config.json: '", key, "' must be a boolean"));
    }
    return it->get<bool>();
  }
  absl::StatusOr<std::string> StringOr(absl::string_view key, std::string fallback) const {
    auto it = json_.find(std::string(key));
    if (it == json_.end() || it->is_null()) return fallback;
    if (!it->is_string()) {
      return absl::InvalidArgumentError(absl::StrCat("config.json: '", key, "' must be a string"));
    }
    return it->get<std::string>();
  }
  absl::StatusOr<std::vector<int64_t>> IntListOr(absl::string_view key) const {
    std::vector<int64_t> out;
    auto it = json_.find(std::string(key));
    if (it == json_.end() || it->is_null()) return out;
    if (!it->is_array()) {
      return absl::InvalidArgumentError(absl::StrCat("config.json: '", key, "' must be a list"));
    }
    for (const Json& v : *it) {
      if (!v.is_number_integer()) {
        return absl::InvalidArgumentError(
            absl::StrCat("config.json: '", key, "' must hold integers"));
      }
      out.push_back(v.get<int64_t>());
    }
    return out;
  }

 private:
  absl::Status Missing(std::initializer_list<absl::string_view> keys) const {
    return absl::InvalidArgumentError(absl::StrCat("config.json: missing '",
                                                   absl::StrJoin(keys, "' or '"), "' (model_type ",
                                                   model_type_, ")"));
  }
  const Json& json_;
  absl::string_view model_type_;
};

}  // namespace

const char* FamilyName(ModelFamily family) {
  for (const auto& [f, name] : kFamilies) {
    if (f == family) return name;
  }
  return "unknown";
}

absl::StatusOr<ModelFamily> FamilyFromName(absl::string_view model_type) {
  for (const auto& [f, name] : kFamilies) {
    if (model_type == name) return f;
  }
  return absl::InvalidArgumentError(
      absl::StrCat("unsupported model_type '", model_type, "'; supported: ", SupportedFamilies()));
}

std::string SupportedFamilies() {
  std::vector<std::string> names;
  for (const auto& [f, name] : kFamilies) names.push_back(name);
  return absl::StrJoin(names, ", ");
}

bool MoeModelConfig::IsMoeLayer(int64_t layer) const {
  if (layer < 0 || layer >= num_layers) return false;
  switch (family) {
    case ModelFamily::kQwen2Moe:
    case ModelFamily::kQwen3Moe:
      return std::find(mlp_only_layers.begin(), mlp_only_layers.end(), layer) ==
                 mlp_only_layers.end() &&
             (layer + 1) % decoder_sparse_step == 0;
    case ModelFamily::kDeepseekV2:
    case ModelFamily::kDeepseekV3:
      return layer >= first_k_dense_replace && layer % moe_layer_freq == 0;
    default:
      return true;
  }
}

std::vector<int64_t> MoeModelConfig::MoeLayers() const {
  std::vector<int64_t> layers;
  for (int64_t l = 0; l < num_layers; ++l) {
    if (IsMoeLayer(l)) layers.push_back(l);
  }
  return layers;
}

absl::Status MoeModelConfig::CheckMoeLayer(int64_t layer) const {
  if (layer < 0 || layer >= num_layers) {
    return absl::InvalidArgumentError(
        absl::StrCat("layer ", layer, " does not exist: the model has ", num_layers, " layers"));
  }
  if (!IsMoeLayer(layer)) {
    return absl::InvalidArgumentError(absl::StrCat("layer ", layer, " is a dense layer, not MoE"));
  }
  return absl::OkStatus();
}

absl::StatusOr<MoeModelConfig> ParseMoeModelConfig(const Json& json) {
  if (!json.is_object()) return absl::InvalidArgumentError("config.json: not a JSON object");
  auto mt = json.find("model_type");
  if (mt == json.end() || !mt->is_string()) {
    return absl::InvalidArgumentError("config.json: missing string 'model_type'");
  }
  const std::string model_type = mt->get<std::string>();
  MoeModelConfig c;
  ASSIGN_OR_RETURN(c.family, FamilyFromName(model_type));
  const ConfigReader r(json, model_type);

  ASSIGN_OR_RETURN(c.hidden_size, r.Positive({"hidden_size"}));
  ASSIGN_OR_RETURN(c.num_layers, r.Positive({"num_hidden_layers"}));
  ASSIGN_OR_RETURN(c.num_experts,
                   r.Positive({"num_local_experts", "num_experts", "n_routed_experts"}));
  // GPT-OSS's own config also spells it experts_per_token.
  ASSIGN_OR_RETURN(c.top_k, r.Positive({"num_experts_per_tok", "experts_per_token"}));
  ASSIGN_OR_RETURN(std::string act, r.StringOr("hidden_act", "silu"));

  RoutingParams& rp = c.routing;
  switch (c.family) {
    case ModelFamily::kMixtral: {
      ASSIGN_OR_RETURN(c.expert_intermediate, r.Positive({"intermediate_size"}));
      rp.scoring = Scoring::kSoftmax;
      rp.normalize = true;
      break;
    }
    case ModelFamily::kQwen2Moe:
    case ModelFamily::kQwen3Moe: {
      ASSIGN_OR_RETURN(c.expert_intermediate, r.Positive({"moe_intermediate_size"}));
      rp.scoring = Scoring::kSoftmax;
      ASSIGN_OR_RETURN(rp.normalize, r.BoolOr("norm_topk_prob", false));
      ASSIGN_OR_RETURN(c.decoder_sparse_step, r.IntOr("decoder_sparse_step", 1));
      ASSIGN_OR_RETURN(c.mlp_only_layers, r.IntListOr("mlp_only_layers"));
      if (c.family == ModelFamily::kQwen2Moe) {
        ASSIGN_OR_RETURN(c.shared_intermediate, r.Int({"shared_expert_intermediate_size"}));
        c.shared_expert_gated = c.shared_intermediate > 0;
      }
      break;
    }
    case ModelFamily::kDeepseekV2:
    case ModelFamily::kDeepseekV3: {
      const bool v3 = c.family == ModelFamily::kDeepseekV3;
      ASSIGN_OR_RETURN(c.expert_intermediate, r.Positive({"moe_intermediate_size"}));
      ASSIGN_OR_RETURN(int64_t n_shared, r.Int({"n_shared_experts"}));
      // Saturated, not wrapped, on overflow: the size bounds below then reject it.
      if (__builtin_mul_overflow(n_shared, c.expert_intermediate, &c.shared_intermediate)) {
        c.shared_intermediate = std::numeric_limits<int64_t>::max();
      }
      ASSIGN_OR_RETURN(c.first_k_dense_replace, r.IntOr("first_k_dense_replace", 0));
      ASSIGN_OR_RETURN(c.moe_layer_freq, r.IntOr("moe_layer_freq", 1));
      ASSIGN_OR_RETURN(double scale, r.NumberOr("routed_scaling_factor", 1.0));
      rp.scaling = static_cast<float>(scale);
      ASSIGN_OR_RETURN(std::string scoring, r.StringOr("scoring_func", v3 ? "sigmoid" : "softmax"));
      ASSIGN_OR_RETURN(std::string method, r.StringOr("topk_method", v3 ? "noaux_tc" : "greedy"));
      ASSIGN_OR_RETURN(const int64_t n_group, r.IntOr("n_group", 1));
      ASSIGN_OR_RETURN(const int64_t topk_group, r.IntOr("topk_group", n_group));
      // RoutingParams holds ints: larger values would wrap into plausible ones.
      if (n_group < 1 || n_group > c.num_experts || topk_group < 1 || topk_group > n_group) {
        return absl::InvalidArgumentError(
            absl::StrCat("config.json: 'n_group' ", n_group, " must be in [1, ", c.num_experts,
                         "] and 'topk_group' ", topk_group, " in [1, n_group]"));
      }
      if (v3) {
        // HF's DeepseekV3 router: sigmoid scores, corrected choice, top-2-sum groups,
        // normalise (+1e-20) when norm_topk_prob, then scale.
        if (scoring != "sigmoid") {
          return absl::InvalidArgumentError(absl::StrCat("config.json: deepseek_v3 scoring_func '",
                                                         scoring, "' unsupported (want sigmoid)"));
        }
        rp.scoring = Scoring::kSigmoid;
        rp.group_score = GroupScore::kTop2Sum;
        rp.num_groups = static_cast<int>(n_group);
        rp.topk_groups = static_cast<int>(topk_group);
        ASSIGN_OR_RETURN(rp.normalize, r.BoolOr("norm_topk_prob", true));
        rp.normalize_eps = 1e-20f;
      } else {
        // HF's DeepseekV2 port: softmax scores, greedy or group-limited (group max),
        // weights scaled by routed_scaling_factor and never renormalised.
        if (scoring != "softmax") {
          return absl::InvalidArgumentError(absl::StrCat("config.json: deepseek_v2 scoring_func '",
                                                         scoring, "' unsupported (want softmax)"));
        }
        rp.scoring = Scoring::kSoftmax;
        if (method == "group_limited_greedy") {
          rp.num_groups = static_cast<int>(n_group);
          rp.topk_groups = static_cast<int>(topk_group);
          rp.group_score = GroupScore::kMax;
        } else if (method != "greedy") {
          return absl::InvalidArgumentError(
              absl::StrCat("config.json: deepseek_v2 topk_method '", method, "' unsupported"));
        }
        rp.normalize = false;
      }
      break;
    }
    case ModelFamily::kGptOss: {
      ASSIGN_OR_RETURN(c.expert_intermediate, r.Positive({"intermediate_size"}));
      rp.scoring = Scoring::kSoftmaxOverTopK;
      c.activation = Activation::kClampedSwiGlu;
      ASSIGN_OR_RETURN(double limit, r.NumberOr("swiglu_limit", 7.0));
      // The gate is clamped to at most the limit and up to [-limit, limit]: a limit that
      // is not positive, or not finite as a float, would compute nonsense unnoticed.
      if (!(limit > 0) || limit > std::numeric_limits<float>::max()) {
        return absl::InvalidArgumentError(
            absl::StrCat("config.json: 'swiglu_limit' must be positive and finite, got ", limit));
      }
      c.clamp_limit = static_cast<float>(limit);
      act = "silu";  // the clamped SwiGLU is fixed by the family
      break;
    }
  }
  if (act != "silu" && act != "swish") {
    return absl::InvalidArgumentError(absl::StrCat("config.json: hidden_act '", act,
                                                   "' unsupported (model_type ", model_type, ")"));
  }
  if (c.shared_intermediate < 0) {
    return absl::InvalidArgumentError("config.json: shared expert size must not be negative");
  }
  if (c.decoder_sparse_step <= 0 || c.moe_layer_freq <= 0 || c.first_k_dense_replace < 0) {
    return absl::InvalidArgumentError(
        "config.json: decoder_sparse_step and moe_layer_freq must be positive, "
        "first_k_dense_replace non-negative");
  }
  // Bounds far above any released model; they keep hostile configs from overflowing
  // the int sizes the kernels use or asking for absurd allocations.
  if (c.hidden_size > (1 << 20) || c.expert_intermediate > (1 << 22) ||
      c.shared_intermediate > (1 << 24) || c.num_experts > (1 << 16) || c.num_layers > 4096) {
    return absl::InvalidArgumentError(absl::StrCat(
        "config.json: sizes out of range (hidden_size ", c.hidden_size, ", intermediate ",
        c.expert_intermediate, ", experts ", c.num_experts, ", layers ", c.num_layers, ")"));
  }
  // Checked before the narrowing below, which would wrap a huge top_k into a small one.
  if (c.top_k > c.num_experts) {
    return absl::InvalidArgumentError(absl::StrCat("config.json: 'num_experts_per_tok' ", c.top_k,
                                                   " exceeds the ", c.num_experts, " experts"));
  }
  rp.num_experts = static_cast<int>(c.num_experts);
  rp.top_k = static_cast<int>(c.top_k);
  if (std::string err = rp.Validate(); !err.empty()) {
    return absl::InvalidArgumentError(absl::StrCat("config.json: routing: ", err, " (num_experts ",
                                                   c.num_experts, ", top_k ", c.top_k, ")"));
  }
  if (c.MoeLayers().empty()) {
    return absl::InvalidArgumentError("config.json: the model has no MoE layer");
  }
  return c;
}

}  // namespace moemesh
