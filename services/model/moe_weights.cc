#include "services/model/moe_weights.h"

#include <cstring>

#include "absl/strings/str_cat.h"
#include "services/base/status_macros.h"

namespace moemesh {
namespace {

// Stacked [gate; up] rows (or a bias) into the kernels' packed layout.
Tensor Pack(const Tensor& stacked, int64_t inter, int64_t cols) {
  Tensor out = Tensor::Empty(DType::kF32, stacked.shape());
  PackGateUp(stacked.data<float>(), inter, cols, /*gated=*/true, out.mutable_data<float>());
  return out;
}

// Stacks separate gate [I,H] and up [I,H] projections into gate_up [2I,H].
absl::StatusOr<Tensor> StackGateUp(const Checkpoint& ckpt, const std::string& gate_name,
                                   const std::string& up_name, int64_t inter, int64_t hidden) {
  // Both shapes are the files' before anything is allocated.
  RETURN_IF_ERROR(ckpt.Get(gate_name, {inter, hidden}).status());
  RETURN_IF_ERROR(ckpt.Get(up_name, {inter, hidden}).status());
  Tensor out = Tensor::Empty(DType::kF32, {2 * inter, hidden});
  RETURN_IF_ERROR(ckpt.ReadF32(gate_name, {inter, hidden}, out.mutable_data<float>()));
  RETURN_IF_ERROR(
      ckpt.ReadF32(up_name, {inter, hidden}, out.mutable_data<float>() + inter * hidden));
  return out;
}

// The separate-projection layout every family but GPT-OSS uses.
absl::StatusOr<ExpertWeights> LoadSwiGluExpert(const Checkpoint& ckpt, const std::string& prefix,
                                               const char* gate, const char* up, const char* down,
                                               int64_t inter, int64_t hidden) {
  ExpertWeights w;
  w.hidden = hidden;
  w.intermediate = inter;
  ASSIGN_OR_RETURN(Tensor stacked,
                   StackGateUp(ckpt, absl::StrCat(prefix, ".", gate, ".weight"),
                               absl::StrCat(prefix, ".", up, ".weight"), inter, hidden));
  w.gate_up = Pack(stacked, inter, hidden);
  ASSIGN_OR_RETURN(w.down,
                   ckpt.GetF32(absl::StrCat(prefix, ".", down, ".weight"), {hidden, inter}));
  return w;
}

// Expert e of the fused layout transformers 5 keeps at run time and writes with
// save_pretrained(save_original_format=False): experts.gate_up_proj [E, 2I, H] (gate rows,
// then up rows) and experts.down_proj [E, H, I].
absl::StatusOr<ExpertWeights> LoadFusedSwiGluExpert(const Checkpoint& ckpt, const std::string& p,
                                                    const MoeModelConfig& c, int64_t e) {
  const int64_t E = c.num_experts, H = c.hidden_size, I = c.expert_intermediate;
  ExpertWeights w;
  w.hidden = H;
  w.intermediate = I;
  ASSIGN_OR_RETURN(Tensor stacked, ckpt.GetSliceF32(p + ".gate_up_proj", {E, 2 * I, H}, e));
  w.gate_up = Pack(stacked, I, H);
  ASSIGN_OR_RETURN(w.down, ckpt.GetSliceF32(p + ".down_proj", {E, H, I}, e));
  return w;
}

// GPT-OSS expert e as output-major rows: gate_up [2I, H] (gate and up interleaved: row
// 2i is gate i, row 2i+1 is up i) and down [H, I]. The BF16/F32 release stores them
// input-major (gate_up_proj [E, H, 2I], down_proj [E, I, H]); the MXFP4 release packs the
// output-major rows (gate_up_proj_blocks [E, 2I, H/32, 16], down_proj_blocks [E, H, I/32, 16]).
absl::StatusOr<std::pair<Tensor, Tensor>> GptOssExpertRows(const Checkpoint& ckpt,
                                                           const std::string& p,
                                                           const MoeModelConfig& c, int64_t e) {
  const int64_t E = c.num_experts, H = c.hidden_size, I = c.expert_intermediate;
  if (!ckpt.Has(p + ".gate_up_proj") && ckpt.Has(p + ".gate_up_proj_blocks")) {
    ASSIGN_OR_RETURN(Tensor gate_up, ckpt.GetMxfp4(p + ".gate_up_proj", e, {E, 2 * I, H}));
    ASSIGN_OR_RETURN(Tensor down, ckpt.GetMxfp4(p + ".down_proj", e, {E, H, I}));
    return std::pair{std::move(gate_up), std::move(down)};
  }
  std::pair<Tensor, Tensor> rows{Tensor::Empty(DType::kF32, {2 * I, H}),
                                 Tensor::Empty(DType::kF32, {H, I})};
  const auto parts = {std::tuple{".gate_up_proj", std::vector<int64_t>{E, H, 2 * I}, &rows.first},
                      std::tuple{".down_proj", std::vector<int64_t>{E, I, H}, &rows.second}};
  // Both shapes are checked before either is converted.
  for (const auto& [name, shape, out] : parts) RETURN_IF_ERROR(ckpt.Get(p + name, shape).status());
  for (const auto& [name, shape, out] : parts) {
    ASSIGN_OR_RETURN(Tensor t, ckpt.GetSliceF32(p + name, shape, e));
    const int64_t in = shape[1], out_features = shape[2];
    const float* src = t.data<float>();
    float* dst = out->mutable_data<float>();
    for (int64_t i = 0; i < in; ++i) {
      for (int64_t o = 0; o < out_features; ++o) dst[o * in + i] = src[i * out_features + o];
    }
  }
  return rows;
}

// GPT-OSS expert e: gate_up [2I, H] with gate rows first, packed for the kernels.
absl::StatusOr<ExpertWeights> LoadGptOssExpert(const Checkpoint& ckpt, const MoeModelConfig& c,
                                               int64_t layer, int64_t e) {
  const std::string p = MoePrefix(ckpt, c, layer) + ".experts";
  const int64_t E = c.num_experts, H = c.hidden_size, I = c.expert_intermediate;
  ExpertWeights w;
  w.hidden = H;
  w.intermediate = I;
  ASSIGN_OR_RETURN(auto rows, GptOssExpertRows(ckpt, p, c, e));
  ASSIGN_OR_RETURN(Tensor gub, ckpt.GetSliceF32(p + ".gate_up_proj_bias", {E, 2 * I}, e));
  ASSIGN_OR_RETURN(w.down_bias, ckpt.GetSliceF32(p + ".down_proj_bias", {E, H}, e));

  // De-interleave: gate = even rows, up = odd rows.
  Tensor stacked = Tensor::Empty(DType::kF32, {2 * I, H});
  Tensor stacked_bias = Tensor::Empty(DType::kF32, {2 * I});
  const float* src = rows.first.data<float>();
  for (int64_t i = 0; i < I; ++i) {
    for (int64_t half : {int64_t{0}, int64_t{1}}) {
      std::memcpy(stacked.mutable_data<float>() + (half * I + i) * H, src + (2 * i + half) * H,
                  H * sizeof(float));
      stacked_bias.mutable_data<float>()[half * I + i] = gub.data<float>()[2 * i + half];
    }
  }
  w.gate_up = Pack(stacked, I, H);
  w.gate_up_bias = Pack(stacked_bias, I, 1);
  w.down = std::move(rows.second);
  return w;
}

}  // namespace

std::string MoePrefix(const Checkpoint& ckpt, const MoeModelConfig& c, int64_t layer) {
  const std::string mlp = absl::StrCat("model.layers.", layer, ".mlp");
  if (c.family != ModelFamily::kMixtral) return mlp;
  // Mixtral's own name, or the one transformers 5 uses at run time.
  const std::string own = absl::StrCat("model.layers.", layer, ".block_sparse_moe");
  return !ckpt.Has(own + ".gate.weight") && ckpt.Has(mlp + ".gate.weight") ? mlp : own;
}

ExpertFfnWeights ExpertWeights::View(const MoeModelConfig& config) const {
  ExpertFfnWeights v;
  v.hidden = hidden;
  v.intermediate = intermediate;
  v.activation = config.activation;
  v.clamp_limit = config.clamp_limit;
  v.alpha = config.alpha;
  v.gate_up = gate_up.data<float>();
  v.gate_up_bias = gate_up_bias.raw() ? gate_up_bias.data<float>() : nullptr;
  v.down = down.data<float>();
  v.down_bias = down_bias.raw() ? down_bias.data<float>() : nullptr;
  return v;
}

int64_t ExpertBytes(const MoeModelConfig& c) {
  const int64_t H = c.hidden_size, I = c.expert_intermediate;
  const bool gated = c.activation != Activation::kRelu;
  const int64_t gate_up = (gated ? 2 : 1) * I;
  const int64_t biases = c.family == ModelFamily::kGptOss ? gate_up + H : 0;
  return (gate_up * H + H * I + biases) * static_cast<int64_t>(sizeof(float));
}

int64_t ExpertWeights::bytes() const {
  return static_cast<int64_t>(gate_up.nbytes() + down.nbytes() +
                              (gate_up_bias.raw() ? gate_up_bias.nbytes() : 0) +
                              (down_bias.raw() ? down_bias.nbytes() : 0));
}

absl::StatusOr<GateWeights> LoadGate(const Checkpoint& ckpt, const MoeModelConfig& c,
                                     int64_t layer) {
  RETURN_IF_ERROR(c.CheckMoeLayer(layer));
  const std::string p = MoePrefix(ckpt, c, layer);
  const int64_t E = c.num_experts, H = c.hidden_size;
  GateWeights g;
  if (c.family == ModelFamily::kGptOss) {
    ASSIGN_OR_RETURN(g.weight, ckpt.GetF32(p + ".router.weight", {E, H}));
    ASSIGN_OR_RETURN(g.bias, ckpt.GetF32(p + ".router.bias", {E}));
    return g;
  }
  ASSIGN_OR_RETURN(g.weight, ckpt.GetF32(p + ".gate.weight", {E, H}));
  if (c.family == ModelFamily::kDeepseekV3) {
    ASSIGN_OR_RETURN(g.correction_bias, ckpt.GetF32(p + ".gate.e_score_correction_bias", {E}));
  }
  return g;
}

absl::StatusOr<ExpertWeights> LoadExpert(const Checkpoint& ckpt, const MoeModelConfig& c,
                                         int64_t layer, int64_t expert) {
  RETURN_IF_ERROR(c.CheckMoeLayer(layer));
  if (expert < 0 || expert >= c.num_experts) {
    return absl::InvalidArgumentError(
        absl::StrCat("expert ", expert, " out of range [0, ", c.num_experts, ")"));
  }
  if (c.family == ModelFamily::kGptOss) return LoadGptOssExpert(ckpt, c, layer, expert);
  const std::string experts = MoePrefix(ckpt, c, layer) + ".experts";
  const std::string p = absl::StrCat(experts, ".", expert);
  const bool mixtral = c.family == ModelFamily::kMixtral;
  const char* gate = mixtral ? "w1" : "gate_proj";
  if (!ckpt.Has(absl::StrCat(p, ".", gate, ".weight")) && ckpt.Has(experts + ".gate_up_proj")) {
    return LoadFusedSwiGluExpert(ckpt, experts, c, expert);
  }
  const int64_t H = c.hidden_size, I = c.expert_intermediate;
  return LoadSwiGluExpert(ckpt, p, gate, mixtral ? "w3" : "up_proj", mixtral ? "w2" : "down_proj",
                          I, H);
}

absl::StatusOr<std::optional<SharedExpertWeights>> LoadSharedExperts(const Checkpoint& ckpt,
                                                                     const MoeModelConfig& c,
                                                                     int64_t layer) {
  RETURN_IF_ERROR(c.CheckMoeLayer(layer));
  if (c.shared_intermediate == 0) return std::nullopt;
  const std::string p = MoePrefix(ckpt, c, layer);
  const int64_t H = c.hidden_size, I = c.shared_intermediate;
  SharedExpertWeights s;
  const bool qwen = c.family == ModelFamily::kQwen2Moe;
  ASSIGN_OR_RETURN(s.ffn, LoadSwiGluExpert(ckpt, p + (qwen ? ".shared_expert" : ".shared_experts"),
                                           "gate_proj", "up_proj", "down_proj", I, H));
  if (c.shared_expert_gated) {
    ASSIGN_OR_RETURN(s.gate, ckpt.GetF32(p + ".shared_expert_gate.weight", {1, H}));
  }
  return s;
}

}  // namespace moemesh
