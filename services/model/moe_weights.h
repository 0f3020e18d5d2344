// Loading one MoE layer's weights from a checkpoint, family by family, into the single
// float32 layout the kernels use:
//   gate:    [E, H] router weight (+ [E] router bias for GPT-OSS,
//            + [E] e_score_correction_bias for DeepSeek-V3)
//   expert:  gate_up [2I, H] in the kernels' packed block layout (kernels/cpu/expert_ffn.h),
//            down [H, I] (+ biases, GPT-OSS)
// GPT-OSS's fused [E, H, 2I] interleaved tensors are de-interleaved and transposed here,
// so nothing downstream knows the family. Only the requested tensors are read.
#pragma once

#include <cstdint>
#include <optional>
#include <string>

#include "absl/status/statusor.h"
#include "kernels/cpu/expert_ffn.h"
#include "services/base/tensor.h"
#include "services/model/checkpoint.h"
#include "services/model/model_config.h"

namespace moemesh {

struct ExpertWeights {
  Tensor gate_up;       // F32 [2I, H], packed (PackGateUp)
  Tensor gate_up_bias;  // F32 [2I], packed, or undefined
  Tensor down;          // F32 [H, I]
  Tensor down_bias;     // F32 [H] or undefined
  int64_t hidden = 0;
  int64_t intermediate = 0;

  // A kernel view; valid while this object lives.
  ExpertFfnWeights View(const MoeModelConfig& config) const;
  int64_t bytes() const;
};

struct GateWeights {
  Tensor weight;           // F32 [E, H]
  Tensor bias;             // F32 [E] (GPT-OSS) or undefined
  Tensor correction_bias;  // F32 [E] (DeepSeek-V3) or undefined
};

struct SharedExpertWeights {
  ExpertWeights ffn;  // intermediate = config.shared_intermediate
  Tensor gate;        // F32 [1, H] (Qwen2-MoE shared_expert_gate) or undefined
};

// The layer must be an MoE layer of config (CheckMoeLayer).
absl::StatusOr<GateWeights> LoadGate(const Checkpoint& ckpt, const MoeModelConfig& config,
                                     int64_t layer);
absl::StatusOr<ExpertWeights> LoadExpert(const Checkpoint& ckpt, const MoeModelConfig& config,
                                         int64_t layer, int64_t expert);
// nullopt when the family has no shared expert.
absl::StatusOr<std::optional<SharedExpertWeights>> LoadSharedExperts(const Checkpoint& ckpt,
                                                                     const MoeModelConfig& config,
                                                                     int64_t layer);

// The float32 bytes one routed expert of `config` takes as an expert service holds it
// (ExpertWeights::bytes of any of them): what moving one copies.
int64_t ExpertBytes(const MoeModelConfig& config);

// The MoE block's tensor-name prefix in `ckpt`, e.g. "model.layers.3.block_sparse_moe"
// (Mixtral as released) or "model.layers.3.mlp" (every other family, and Mixtral as
// transformers 5 names it at run time).
std::string MoePrefix(const Checkpoint& ckpt, const MoeModelConfig& config, int64_t layer);

}  // namespace moemesh
