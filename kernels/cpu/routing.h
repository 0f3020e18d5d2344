// Token-choice routing on the CPU: router logits -> (expert ids, weights) per token.
//
// One parameterised routine covers every family in MODEL_FAMILIES.md: the family
// code (services/model/model_config.h) only fills RoutingParams. Logits arrive in float32
// (x·Wgᵀ + bias, computed by the caller's GEMM), as HF computes them.
//
// Selection order: each token's k choices come out in descending order of the
// selection score (as torch.topk returns them); equal scores keep the lower expert id
// first, so results are deterministic.
#pragma once

#include <cstdint>
#include <string>

namespace moemesh {

enum class Scoring : uint8_t {
  kSoftmax,         // p = softmax(logits) over all experts; choose top-k of p.
  kSigmoid,         // s = sigmoid(logits); choose top-k of s (+ correction bias).
  kSoftmaxOverTopK  // choose top-k of the logits; w = softmax over those k logits.
};

enum class GroupScore : uint8_t {
  kMax,      // a group's score is its largest score (DeepSeek-V2 group_limited_greedy).
  kTop2Sum,  // a group's score is the sum of its two largest scores (DeepSeek-V3).
};

struct RoutingParams {
  int num_experts = 0;
  int top_k = 0;
  Scoring scoring = Scoring::kSoftmax;
  // Group-limited selection: experts split into num_groups equal groups, only the
  // topk_groups best groups are eligible. num_groups == 1 disables it.
  int num_groups = 1;
  int topk_groups = 1;
  GroupScore group_score = GroupScore::kMax;
  // w = w / (Σ w + normalize_eps) over the k chosen weights.
  bool normalize = false;
  float normalize_eps = 0.0f;
  // Applied after normalisation.
  float scaling = 1.0f;

  // Empty when valid, else a message naming the bad field.
  std::string Validate() const;
};

// Routes T tokens.
//   logits          [T, E] float32.
//   correction_bias [E] or nullptr: added to the scores for choosing only (DeepSeek-V3).
//   topk_ids        [T, k] out.
//   topk_weights    [T, k] out.
//   scores          [T, E] out or nullptr: the router probabilities (softmax/sigmoid;
//                   for kSoftmaxOverTopK the softmax over all logits), for load statistics.
// params must be valid.
void RouteTopK(const RoutingParams& params, const float* logits, int64_t num_tokens,
               const float* correction_bias, int32_t* topk_ids, float* topk_weights, float* scores);

}  // namespace moemesh
