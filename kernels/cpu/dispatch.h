// Permute and combine: the bookkeeping that turns per-token routing choices into
// per-expert row blocks and back.
//
// A DispatchPlan groups the (token, choice) slots by expert: rows of expert e are
// [expert_offsets[e], expert_offsets[e+1]) in the grouped buffer, in token order.
// Each token also lists the grouped rows it reads back, with their weights, in a fixed
// order (its top-k order for token choice, expert order for expert choice): combining
// in that order is what makes the output independent of where the rows were computed.
//
// Plans are reused across calls: Build* resizes their vectors, which stop allocating
// once they have seen the largest batch.
#pragma once

#include <cstdint>
#include <vector>

namespace moemesh {

struct DispatchPlan {
  int64_t num_tokens = 0;
  int num_experts = 0;
  std::vector<int64_t> expert_offsets;  // [E+1] grouped-row range of each expert
  std::vector<int32_t> row_token;       // [rows] source token of each grouped row
  std::vector<int64_t> token_offsets;   // [T+1] range in token_rows/token_weights
  std::vector<int64_t> token_rows;      // grouped rows each token combines
  std::vector<float> token_weights;     // weight of each of those rows
  int64_t dropped = 0;                  // (token, choice) slots over capacity

  int64_t num_rows() const { return expert_offsets.empty() ? 0 : expert_offsets.back(); }
  int64_t rows_of(int e) const { return expert_offsets[e + 1] - expert_offsets[e]; }
};

// Token choice. capacity < 0: dropless. Otherwise each expert admits at most
// `capacity` slots in token order; later slots are dropped (they contribute zero).
// Expert ids must be in [0, num_experts).
void BuildTokenChoicePlan(const int32_t* topk_ids, const float* topk_weights, int64_t num_tokens,
                          int top_k, int num_experts, int64_t capacity, DispatchPlan* plan);

// Expert choice (Zhou et al. 2022): expert e takes the `capacity` tokens with the highest
// scores[t, e] (ties: lower token first); the weight is that score. A token may get
// zero, one or several experts.
void BuildExpertChoicePlan(const float* scores, int64_t num_tokens, int num_experts,
                           int64_t capacity, DispatchPlan* plan);

// Switch/GShard capacity: ceil(capacity_factor · T · k / E), at least 1.
int64_t ExpertCapacity(double capacity_factor, int64_t num_tokens, int top_k, int num_experts);

// out[r, :] = x[plan.row_token[r], :] for rows [row_begin, row_end).
void GatherRows(const float* x, int64_t hidden, const DispatchPlan& plan, int64_t row_begin,
                int64_t row_end, float* out);

// out[t, :] = Σ_j token_weights[j] · y[token_rows[j], :] over token t's rows, in plan
// order, for tokens [token_begin, token_end). Tokens with no rows get zeros.
void CombineRows(const float* y, int64_t hidden, const DispatchPlan& plan, int64_t token_begin,
                 int64_t token_end, float* out);

}  // namespace moemesh
