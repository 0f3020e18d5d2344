#include "services/model/model_generator.h"

#include <cmath>
#include <filesystem>
#include <fstream>
#include <random>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "nlohmann/json.hpp"
#include "services/base/status_macros.h"
#include "services/base/tensor.h"
#include "services/model/safetensors.h"

namespace moemesh {
namespace {

using Json = nlohmann::json;
using Named = std::vector<std::pair<std::string, Tensor>>;

class Generator {
 public:
  Generator(uint64_t seed, DType dtype) : rng_(seed), dtype_(dtype) {}

  // N(0, scale²) values, stored in the checkpoint dtype.
  Tensor Random(std::vector<int64_t> shape, float scale) {
    Tensor f = Tensor::Empty(DType::kF32, std::move(shape));
    std::normal_distribution<float> nd(0.0f, scale);
    float* p = f.mutable_data<float>();
    for (int64_t i = 0; i < f.numel(); ++i) p[i] = nd(rng_);
    if (dtype_ == DType::kF32) return f;
    return f.FromF32(dtype_).value();
  }
  Tensor Linear(int64_t out, int64_t in) {
    return Random({out, in}, 1.0f / std::sqrt(static_cast<float>(in)));
  }
  Tensor RandomF32(std::vector<int64_t> shape, float scale) {
    const DType saved = dtype_;
    dtype_ = DType::kF32;
    Tensor t = Random(std::move(shape), scale);
    dtype_ = saved;
    return t;
  }

 private:
  std::mt19937_64 rng_;
  DType dtype_;
};

void AddMlp(Generator& g, Named& t, const std::string& p, const char* gate, const char* up,
            const char* down, int64_t inter, int64_t hidden) {
  t.emplace_back(absl::StrCat(p, ".", gate, ".weight"), g.Linear(inter, hidden));
  t.emplace_back(absl::StrCat(p, ".", up, ".weight"), g.Linear(inter, hidden));
  t.emplace_back(absl::StrCat(p, ".", down, ".weight"), g.Linear(hidden, inter));
}

}  // namespace

absl::Status GenModelOptions::Validate() const {
  if (hidden <= 0 || intermediate <= 0 || experts <= 0 || layers <= 0 || shared_intermediate < 0) {
    return absl::InvalidArgumentError("sizes must be positive");
  }
  if (top_k <= 0 || top_k > experts)
    return absl::InvalidArgumentError("top_k must be in [1, experts]");
  if (shards <= 0 || shards > 99999)
    return absl::InvalidArgumentError("shards must be in [1, 99999]");
  if (!IsFloatingActivation(dtype))
    return absl::InvalidArgumentError("dtype must be F32, BF16 or F16");
  if (family == ModelFamily::kDeepseekV3 || family == ModelFamily::kDeepseekV2) {
    if (num_groups <= 0 || experts % num_groups != 0 || topk_groups <= 0 ||
        topk_groups > num_groups || topk_groups * (experts / num_groups) < top_k) {
      return absl::InvalidArgumentError(
          "num_groups must divide experts and topk_groups groups must hold top_k experts");
    }
  }
  return absl::OkStatus();
}

absl::Status GenerateModel(const std::string& dir, const GenModelOptions& o) {
  RETURN_IF_ERROR(o.Validate());
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  if (ec) return absl::PermissionDeniedError(absl::StrCat(dir, ": ", ec.message()));

  const int64_t H = o.hidden, I = o.intermediate, E = o.experts;
  Json cfg = {{"model_type", std::string(FamilyName(o.family))},
              {"hidden_size", H},
              {"num_hidden_layers", o.layers},
              {"num_experts_per_tok", o.top_k},
              {"hidden_act", "silu"},
              {"torch_dtype", o.dtype == DType::kF32   ? "float32"
                              : o.dtype == DType::kF16 ? "float16"
                                                       : "bfloat16"}};
  const bool deepseek =
      o.family == ModelFamily::kDeepseekV2 || o.family == ModelFamily::kDeepseekV3;
  const int64_t first_dense = deepseek && o.layers > 1 ? 1 : 0;
  switch (o.family) {
    case ModelFamily::kMixtral:
      cfg["num_local_experts"] = E;
      cfg["intermediate_size"] = I;
      break;
    case ModelFamily::kQwen2Moe:
    case ModelFamily::kQwen3Moe:
      cfg["num_experts"] = E;
      cfg["moe_intermediate_size"] = I;
      cfg["intermediate_size"] = 2 * I;
      cfg["decoder_sparse_step"] = 1;
      cfg["mlp_only_layers"] = Json::array();
      cfg["norm_topk_prob"] = o.family == ModelFamily::kQwen3Moe;
      if (o.family == ModelFamily::kQwen2Moe) {
        cfg["shared_expert_intermediate_size"] = o.shared_intermediate;
      }
      break;
    case ModelFamily::kDeepseekV2:
    case ModelFamily::kDeepseekV3:
      cfg["n_routed_experts"] = E;
      cfg["moe_intermediate_size"] = I;
      cfg["intermediate_size"] = 2 * I;
      cfg["n_shared_experts"] =
          o.shared_intermediate > 0 ? std::max<int64_t>(1, o.shared_intermediate / I) : 0;
      cfg["n_group"] = o.num_groups;
      cfg["topk_group"] = o.topk_groups;
      cfg["first_k_dense_replace"] = first_dense;
      cfg["moe_layer_freq"] = 1;
      cfg["norm_topk_prob"] = true;
      if (o.family == ModelFamily::kDeepseekV3) {
        cfg["routed_scaling_factor"] = 2.5;
        cfg["scoring_func"] = "sigmoid";
        cfg["topk_method"] = "noaux_tc";
      } else {
        cfg["routed_scaling_factor"] = 1.0;
        cfg["scoring_func"] = "softmax";
        cfg["topk_method"] = "group_limited_greedy";
      }
      break;
    case ModelFamily::kGptOss:
      cfg["num_local_experts"] = E;
      cfg["intermediate_size"] = I;
      cfg["swiglu_limit"] = 7.0;
      break;
  }

  ASSIGN_OR_RETURN(MoeModelConfig mc, ParseMoeModelConfig(cfg));
  const int64_t shared_I = mc.shared_intermediate;
  Generator g(o.seed, o.dtype);
  Named tensors;
  tensors.emplace_back("model.embed_tokens.weight", g.Linear(16, H));
  for (int64_t l = 0; l < o.layers; ++l) {
    const std::string layer = absl::StrCat("model.layers.", l);
    if (!mc.IsMoeLayer(l)) {
      AddMlp(g, tensors, layer + ".mlp", "gate_proj", "up_proj", "down_proj", 2 * I, H);
      continue;
    }
    const std::string p =
        absl::StrCat(layer, o.family == ModelFamily::kMixtral ? ".block_sparse_moe" : ".mlp");
    switch (o.family) {
      case ModelFamily::kMixtral:
        tensors.emplace_back(p + ".gate.weight", g.Linear(E, H));
        for (int64_t e = 0; e < E; ++e)
          AddMlp(g, tensors, absl::StrCat(p, ".experts.", e), "w1", "w3", "w2", I, H);
        break;
      case ModelFamily::kGptOss:
        tensors.emplace_back(p + ".router.weight", g.Linear(E, H));
        tensors.emplace_back(p + ".router.bias", g.Random({E}, 0.1f));
        tensors.emplace_back(p + ".experts.gate_up_proj",
                             g.Random({E, H, 2 * I}, 1.0f / std::sqrt(float(H))));
        tensors.emplace_back(p + ".experts.gate_up_proj_bias", g.Random({E, 2 * I}, 0.1f));
        tensors.emplace_back(p + ".experts.down_proj",
                             g.Random({E, I, H}, 1.0f / std::sqrt(float(I))));
        tensors.emplace_back(p + ".experts.down_proj_bias", g.Random({E, H}, 0.1f));
        break;
      default:
        tensors.emplace_back(p + ".gate.weight", g.Linear(E, H));
        if (o.family == ModelFamily::kDeepseekV3) {
          tensors.emplace_back(p + ".gate.e_score_correction_bias", g.RandomF32({E}, 0.1f));
        }
        for (int64_t e = 0; e < E; ++e) {
          AddMlp(g, tensors, absl::StrCat(p, ".experts.", e), "gate_proj", "up_proj", "down_proj",
                 I, H);
        }
        if (shared_I > 0) {
          const bool qwen = o.family == ModelFamily::kQwen2Moe;
          AddMlp(g, tensors, p + (qwen ? ".shared_expert" : ".shared_experts"), "gate_proj",
                 "up_proj", "down_proj", shared_I, H);
          if (qwen) tensors.emplace_back(p + ".shared_expert_gate.weight", g.Linear(1, H));
        }
        break;
    }
  }

  cfg["moemesh_generated_seed"] = o.seed;
  {
    std::ofstream f(std::filesystem::path(dir) / "config.json");
    f << cfg.dump(2) << "\n";
    if (!f) return absl::InternalError(absl::StrCat(dir, "/config.json: write failed"));
  }
  const std::map<std::string, std::string> meta = {{"format", "pt"}};
  if (o.shards == 1) {
    return WriteSafetensors((std::filesystem::path(dir) / "model.safetensors").string(), tensors,
                            meta);
  }
  // Contiguous runs of tensors per shard, HF's naming.
  Json weight_map = Json::object();
  uint64_t total = 0;
  const size_t per = (tensors.size() + o.shards - 1) / o.shards;
  for (int s = 0; s < o.shards; ++s) {
    const std::string name = absl::StrFormat("model-%05d-of-%05d.safetensors", s + 1, o.shards);
    Named part;
    for (size_t i = s * per; i < std::min(tensors.size(), (s + 1) * per); ++i) {
      part.push_back(tensors[i]);
      weight_map[tensors[i].first] = name;
      total += tensors[i].second.nbytes();
    }
    RETURN_IF_ERROR(WriteSafetensors((std::filesystem::path(dir) / name).string(), part, meta));
  }
  std::ofstream f(std::filesystem::path(dir) / "model.safetensors.index.json");
  f << Json{{"metadata", {{"total_size", total}}}, {"weight_map", weight_map}}.dump(2) << "\n";
  if (!f)
    return absl::InternalError(absl::StrCat(dir, "/model.safetensors.index.json: write failed"));
  return absl::OkStatus();
}

}  // namespace moemesh

namespace moemesh {

GenModelOptions SmallModelOptions(ModelFamily family, uint64_t seed) {
  GenModelOptions o;
  o.family = family;
  o.hidden = 64;
  o.intermediate = 48;
  o.shared_intermediate = 48;
  o.experts = 8;
  o.top_k = 2;
  o.layers = 2;
  o.num_groups = 2;
  o.topk_groups = 1;
  o.dtype = DType::kBF16;
  o.seed = seed;
  return o;
}

absl::StatusOr<GeneratedModel> GenerateAndOpen(const std::string& dir,
                                               const GenModelOptions& options) {
  RETURN_IF_ERROR(GenerateModel(dir, options));
  GeneratedModel m;
  m.dir = dir;
  ASSIGN_OR_RETURN(m.ckpt, Checkpoint::Open(dir));
  ASSIGN_OR_RETURN(m.config, ParseMoeModelConfig(m.ckpt->config()));
  return m;
}

}  // namespace moemesh
