// libFuzzer target for config.json: the bytes parsed by nlohmann::json without exceptions,
// then ParseMoeModelConfig. Whatever config it accepts must be one the services can size
// buffers and route with: its family named by its model_type; sizes positive and within
// the parser's bounds (the kernels' int sizes); top-k within the experts; RoutingParams
// valid and agreeing with the config; layer selection parameters sane; at least one MoE
// layer, MoeLayers() ascending and in range, and CheckMoeLayer accepting exactly those;
// the activation the family's. Refusals are INVALID_ARGUMENT with a message.
//
//   ninja -C build-fuzz model_config_fuzzer
//   build-fuzz/services/model/model_config_fuzzer tests/fuzz_corpus/model_config
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "services/model/model_config.h"

namespace {

void Check(bool ok, const char* what) {
  if (!ok) {
    std::fprintf(stderr, "invariant violated: %s\n", what);
    std::abort();
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using moemesh::ModelFamily;
  const nlohmann::json json =
      nlohmann::json::parse(data, data + size, nullptr, /*allow_exceptions=*/false);
  if (json.is_discarded()) return 0;
  absl::StatusOr<moemesh::MoeModelConfig> parsed = moemesh::ParseMoeModelConfig(json);
  if (!parsed.ok()) {
    Check(parsed.status().code() == absl::StatusCode::kInvalidArgument,
          "refused: INVALID_ARGUMENT");
    Check(!parsed.status().message().empty(), "error without a message");
    return 0;
  }
  const moemesh::MoeModelConfig& c = *parsed;

  const absl::StatusOr<ModelFamily> family =
      moemesh::FamilyFromName(json["model_type"].get<std::string>());
  Check(family.ok() && *family == c.family, "the family is model_type's");
  Check(c.hidden_size > 0 && c.hidden_size <= (1 << 20), "hidden_size in (0, 2^20]");
  Check(c.num_layers > 0 && c.num_layers <= 4096, "num_layers in (0, 4096]");
  Check(c.num_experts > 0 && c.num_experts <= (1 << 16), "num_experts in (0, 2^16]");
  Check(c.top_k > 0 && c.top_k <= c.num_experts, "top_k in [1, num_experts]");
  Check(c.expert_intermediate > 0 && c.expert_intermediate <= (1 << 22),
        "expert_intermediate in (0, 2^22]");
  Check(c.shared_intermediate >= 0 && c.shared_intermediate <= (1 << 24),
        "shared_intermediate in [0, 2^24]");
  const bool has_shared = c.family == ModelFamily::kQwen2Moe ||
                          c.family == ModelFamily::kDeepseekV2 ||
                          c.family == ModelFamily::kDeepseekV3;
  Check(has_shared || c.shared_intermediate == 0, "a shared expert only where the family has one");
  Check(c.shared_expert_gated == (c.family == ModelFamily::kQwen2Moe && c.shared_intermediate > 0),
        "a gated shared expert: Qwen2-MoE's, when it has one");

  Check(c.routing.num_experts == c.num_experts && c.routing.top_k == c.top_k,
        "routing agrees with the config");
  Check(c.routing.Validate().empty(), "routing parameters valid");
  Check(std::isfinite(c.routing.scaling), "routing scaling finite");
  Check(c.routing.num_groups >= 1 && c.routing.topk_groups >= 1 &&
            c.routing.topk_groups <= c.routing.num_groups,
        "routing groups");
  Check((c.family == ModelFamily::kGptOss) == (c.activation == moemesh::Activation::kClampedSwiGlu),
        "GPT-OSS's clamped SwiGLU, SwiGLU elsewhere");
  Check(std::isfinite(c.clamp_limit) && c.clamp_limit > 0, "clamp limit positive and finite");

  Check(c.decoder_sparse_step > 0 && c.moe_layer_freq > 0 && c.first_k_dense_replace >= 0,
        "layer selection parameters");
  const std::vector<int64_t> layers = c.MoeLayers();
  Check(!layers.empty(), "at least one MoE layer");
  size_t next = 0;
  for (int64_t l = -1; l <= c.num_layers; ++l) {
    const bool listed = next < layers.size() && layers[next] == l;
    if (listed) ++next;
    Check(listed == c.IsMoeLayer(l), "MoeLayers lists exactly the MoE layers, ascending");
    Check(listed == c.CheckMoeLayer(l).ok(), "CheckMoeLayer accepts exactly the MoE layers");
  }
  Check(next == layers.size(), "MoeLayers in range");
  return 0;
}
