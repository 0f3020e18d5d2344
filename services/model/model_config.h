// What a checkpoint's config.json says about its MoE layers, for every supported family:
// sizes, which layers are MoE, the routing rule, the expert activation and the tensor
// names. The family-specific knowledge of MODEL_FAMILIES.md lives here (config keys,
// routing parameters) and in moe_weights.cc (tensor layouts); everything downstream is
// family-agnostic.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "kernels/cpu/expert_ffn.h"
#include "kernels/cpu/routing.h"
#include "nlohmann/json.hpp"

namespace moemesh {

enum class ModelFamily : uint8_t {
  kMixtral,
  kQwen2Moe,
  kQwen3Moe,
  kDeepseekV2,
  kDeepseekV3,
  kGptOss,
};

// Every family, in declaration order.
inline constexpr ModelFamily kAllFamilies[] = {ModelFamily::kMixtral,    ModelFamily::kQwen2Moe,
                                               ModelFamily::kQwen3Moe,   ModelFamily::kDeepseekV2,
                                               ModelFamily::kDeepseekV3, ModelFamily::kGptOss};

// config.json's model_type for a family ("mixtral", ...).
const char* FamilyName(ModelFamily family);
absl::StatusOr<ModelFamily> FamilyFromName(absl::string_view model_type);
// Every supported model_type, for messages and --help.
std::string SupportedFamilies();

struct MoeModelConfig {
  ModelFamily family = ModelFamily::kMixtral;
  int64_t hidden_size = 0;
  int64_t num_layers = 0;
  int64_t num_experts = 0;
  int64_t top_k = 0;
  int64_t expert_intermediate = 0;
  // Shared expert(s) computed for every token; 0 when the family has none.
  int64_t shared_intermediate = 0;
  // Qwen2-MoE: the shared expert's output is scaled by sigmoid(x·w_sgᵀ).
  bool shared_expert_gated = false;
  RoutingParams routing;
  Activation activation = Activation::kSwiGlu;
  float clamp_limit = 7.0f;  // GPT-OSS
  float alpha = 1.702f;      // GPT-OSS

  // Which layers are MoE (the rest are dense MLPs that the mesh does not serve).
  int64_t first_k_dense_replace = 0;     // DeepSeek
  int64_t moe_layer_freq = 1;            // DeepSeek
  int64_t decoder_sparse_step = 1;       // Qwen2/3-MoE
  std::vector<int64_t> mlp_only_layers;  // Qwen2/3-MoE

  bool IsMoeLayer(int64_t layer) const;
  std::vector<int64_t> MoeLayers() const;
  // INVALID_ARGUMENT naming the layer when it is out of range or dense.
  absl::Status CheckMoeLayer(int64_t layer) const;
};

// Parses config.json. Accepts each key's spellings (num_experts / num_local_experts /
// n_routed_experts); an unknown model_type or a missing key is an error naming it.
absl::StatusOr<MoeModelConfig> ParseMoeModelConfig(const nlohmann::json& config);

}  // namespace moemesh
