#include "kernels/cpu/dispatch.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>

namespace moemesh {

void BuildTokenChoicePlan(const int32_t* topk_ids, const float* topk_weights, int64_t num_tokens,
                          int top_k, int num_experts, int64_t capacity, DispatchPlan* plan) {
  const int64_t slots = num_tokens * top_k;
  plan->num_tokens = num_tokens;
  plan->num_experts = num_experts;
  plan->dropped = 0;
  auto& offsets = plan->expert_offsets;
  offsets.assign(num_experts + 1, 0);
  // Counting sort by expert; a slot is admitted while its expert has room, in token
  // order, which is the Switch/GShard overflow rule.
  for (int64_t s = 0; s < slots; ++s) {
    int64_t& n = offsets[topk_ids[s] + 1];
    if (capacity < 0 || n < capacity) {
      ++n;
    } else {
      ++plan->dropped;
    }
  }
  for (int e = 0; e < num_experts; ++e) offsets[e + 1] += offsets[e];
  const int64_t rows = offsets[num_experts];
  plan->row_token.resize(rows);
  plan->token_offsets.resize(num_tokens + 1);
  plan->token_rows.resize(rows);
  plan->token_weights.resize(rows);

  // Second pass: place admitted slots; `cursor` reuses a scratch vector in the plan's
  // spirit of no per-call growth once warm.
  thread_local std::vector<int64_t> cursor;
  cursor.assign(offsets.begin(), offsets.end() - 1);
  int64_t out = 0;
  for (int64_t t = 0; t < num_tokens; ++t) {
    plan->token_offsets[t] = out;
    for (int j = 0; j < top_k; ++j) {
      const int32_t e = topk_ids[t * top_k + j];
      int64_t& c = cursor[e];
      if (c == offsets[e + 1]) continue;  // dropped
      plan->row_token[c] = static_cast<int32_t>(t);
      plan->token_rows[out] = c;
      plan->token_weights[out] = topk_weights[t * top_k + j];
      ++out;
      ++c;
    }
  }
  plan->token_offsets[num_tokens] = out;
}

void BuildExpertChoicePlan(const float* scores, int64_t num_tokens, int num_experts,
                           int64_t capacity, DispatchPlan* plan) {
  const int64_t take = std::min<int64_t>(std::max<int64_t>(capacity, 0), num_tokens);
  plan->num_tokens = num_tokens;
  plan->num_experts = num_experts;
  plan->dropped = 0;
  plan->expert_offsets.resize(num_experts + 1);
  plan->row_token.resize(take * num_experts);
  std::vector<int32_t> order(num_tokens);
  std::vector<int64_t> count(num_tokens + 1, 0);
  for (int e = 0; e < num_experts; ++e) {
    plan->expert_offsets[e] = e * take;
    std::iota(order.begin(), order.end(), 0);
    std::partial_sort(order.begin(), order.begin() + take, order.end(), [&](int32_t a, int32_t b) {
      const float sa = scores[a * num_experts + e], sb = scores[b * num_experts + e];
      return sa > sb || (sa == sb && a < b);
    });
    // Rows of an expert stay in token order, like token choice.
    std::sort(order.begin(), order.begin() + take);
    for (int64_t i = 0; i < take; ++i) {
      plan->row_token[e * take + i] = order[i];
      ++count[order[i] + 1];
    }
  }
  plan->expert_offsets[num_experts] = take * num_experts;
  for (int64_t t = 0; t < num_tokens; ++t) count[t + 1] += count[t];
  plan->token_offsets.assign(count.begin(), count.end());
  plan->token_rows.resize(take * num_experts);
  plan->token_weights.resize(take * num_experts);
  // Rows are visited in expert order, so each token's rows end up in expert order.
  for (int64_t r = 0; r < take * num_experts; ++r) {
    const int32_t t = plan->row_token[r];
    const int e = static_cast<int>(r / std::max<int64_t>(take, 1));
    const int64_t pos = count[t]++;
    plan->token_rows[pos] = r;
    plan->token_weights[pos] = scores[t * num_experts + e];
  }
}

int64_t ExpertCapacity(double capacity_factor, int64_t num_tokens, int top_k, int num_experts) {
  const double c = std::ceil(capacity_factor * static_cast<double>(num_tokens) * top_k /
                             static_cast<double>(num_experts));
  return std::max<int64_t>(1, static_cast<int64_t>(c));
}

void GatherRows(const float* x, int64_t hidden, const DispatchPlan& plan, int64_t row_begin,
                int64_t row_end, float* out) {
  for (int64_t r = row_begin; r < row_end; ++r) {
    std::memcpy(out + (r - row_begin) * hidden, x + plan.row_token[r] * hidden,
                hidden * sizeof(float));
  }
}

void CombineRows(const float* y, int64_t hidden, const DispatchPlan& plan, int64_t token_begin,
                 int64_t token_end, float* out) {
  for (int64_t t = token_begin; t < token_end; ++t) {
    float* o = out + t * hidden;
    const int64_t b = plan.token_offsets[t], e = plan.token_offsets[t + 1];
    if (b == e) {
      std::fill_n(o, hidden, 0.0f);
      continue;
    }
    {
      const float w = plan.token_weights[b];
      const float* src = y + plan.token_rows[b] * hidden;
      for (int64_t h = 0; h < hidden; ++h) o[h] = w * src[h];
    }
    for (int64_t j = b + 1; j < e; ++j) {
      const float w = plan.token_weights[j];
      const float* src = y + plan.token_rows[j] * hidden;
      for (int64_t h = 0; h < hidden; ++h) o[h] += w * src[h];
    }
  }
}

}  // namespace moemesh
