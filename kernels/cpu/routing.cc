#include "kernels/cpu/routing.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "kernels/cpu/routing_math.h"

namespace moemesh {

std::string RoutingParams::Validate() const {
  if (num_experts <= 0) return "num_experts must be positive";
  if (top_k <= 0 || top_k > num_experts) return "top_k must be in [1, num_experts]";
  if (num_groups <= 0 || num_experts % num_groups != 0) {
    return "num_groups must divide num_experts";
  }
  if (num_groups > 1) {
    if (topk_groups <= 0 || topk_groups > num_groups) {
      return "topk_groups must be in [1, num_groups]";
    }
    const int eligible = topk_groups * (num_experts / num_groups);
    if (eligible < top_k) return "topk_groups leave fewer than top_k eligible experts";
    if (group_score == GroupScore::kTop2Sum && num_experts / num_groups < 2) {
      return "top-2 group scores need at least two experts per group";
    }
  }
  if (!std::isfinite(scaling)) return "scaling must be finite";
  return {};
}

namespace {

// Keeps the k largest (value, index) pairs of v[0..n) in ids/vals, descending; ties
// keep the lower index first. k is small (≤ 8 in practice), so insertion is cheapest.
void TopK(const float* v, int n, int k, int32_t* ids, float* vals) {
  int filled = 0;
  for (int e = 0; e < n; ++e) {
    const float x = v[e];
    if (filled == k && !(x > vals[k - 1])) continue;
    int pos = filled < k ? filled++ : k - 1;
    while (pos > 0 && x > vals[pos - 1]) {
      vals[pos] = vals[pos - 1];
      ids[pos] = ids[pos - 1];
      --pos;
    }
    vals[pos] = x;
    ids[pos] = e;
  }
}

void Softmax(const float* x, int n, float* out) {
  float mx = -std::numeric_limits<float>::infinity();
  for (int i = 0; i < n; ++i) mx = std::max(mx, x[i]);
  float sum = 0.0f;
  for (int i = 0; i < n; ++i) {
    out[i] = std::exp(x[i] - mx);
    sum += out[i];
  }
  const float inv = 1.0f / sum;
  for (int i = 0; i < n; ++i) out[i] *= inv;
}

}  // namespace

void RouteTopK(const RoutingParams& p, const float* logits, int64_t num_tokens,
               const float* correction_bias, int32_t* topk_ids, float* topk_weights,
               float* scores_out) {
  const int E = p.num_experts;
  const int k = p.top_k;
  const int group_size = E / p.num_groups;
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  // Per-call scratch, sized by E, not by tokens.
  std::vector<float> scores(E), choice(E), group_scores(p.num_groups), tmp_vals(k);
  std::vector<int32_t> group_ids(p.topk_groups);
  std::vector<float> group_top(p.topk_groups);

  for (int64_t t = 0; t < num_tokens; ++t) {
    const float* lg = logits + t * E;
    int32_t* ids = topk_ids + t * k;
    float* w = topk_weights + t * k;

    switch (p.scoring) {
      case Scoring::kSoftmax:
        Softmax(lg, E, scores.data());
        break;
      case Scoring::kSigmoid:
        for (int e = 0; e < E; ++e) scores[e] = 1.0f / (1.0f + std::exp(-lg[e]));
        break;
      case Scoring::kSoftmaxOverTopK:
        std::copy(lg, lg + E, scores.begin());
        break;
    }
    if (scores_out != nullptr) {
      if (p.scoring == Scoring::kSoftmaxOverTopK) {
        Softmax(lg, E, scores_out + t * E);
      } else {
        std::copy(scores.begin(), scores.end(), scores_out + t * E);
      }
    }

    for (int e = 0; e < E; ++e) {
      choice[e] = ChoiceValue(correction_bias ? scores[e] + correction_bias[e] : scores[e]);
    }

    if (p.num_groups > 1) {
      for (int g = 0; g < p.num_groups; ++g) {
        const float* c = choice.data() + g * group_size;
        float best = kNegInf, second = kNegInf;
        for (int i = 0; i < group_size; ++i) {
          if (c[i] > best) {
            second = best;
            best = c[i];
          } else if (c[i] > second) {
            second = c[i];
          }
        }
        group_scores[g] = ChoiceValue(p.group_score == GroupScore::kMax ? best : best + second);
      }
      TopK(group_scores.data(), p.num_groups, p.topk_groups, group_ids.data(), group_top.data());
      for (int g = 0; g < p.num_groups; ++g) {
        if (std::find(group_ids.begin(), group_ids.end(), g) != group_ids.end()) continue;
        std::fill_n(choice.data() + g * group_size, group_size, kNegInf);
      }
    }

    TopK(choice.data(), E, k, ids, tmp_vals.data());

    if (p.scoring == Scoring::kSoftmaxOverTopK) {
      Softmax(tmp_vals.data(), k, w);
    } else {
      for (int j = 0; j < k; ++j) w[j] = scores[ids[j]];
    }
    NormalizeAndScale(p, w, k);
  }
}

}  // namespace moemesh
