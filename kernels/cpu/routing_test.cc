#include "kernels/cpu/routing.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>
#include <vector>

#include "kernels/cpu/routing_testing.h"

namespace moemesh {
namespace {

// Reference routing written the slow, obvious way (full sorts, double precision
// normalisation), to check the fast one against.
void ReferenceRoute(const RoutingParams& p, const std::vector<float>& logits, int64_t T,
                    const float* bias, std::vector<int32_t>* ids, std::vector<float>* w) {
  const int E = p.num_experts, k = p.top_k, gs = E / p.num_groups;
  ids->assign(T * k, -1);
  w->assign(T * k, 0);
  for (int64_t t = 0; t < T; ++t) {
    std::vector<double> s(E), c(E);
    const float* lg = &logits[t * E];
    if (p.scoring == Scoring::kSoftmax) {
      double mx = *std::max_element(lg, lg + E), sum = 0;
      for (int e = 0; e < E; ++e) sum += std::exp(lg[e] - mx);
      for (int e = 0; e < E; ++e) s[e] = std::exp(lg[e] - mx) / sum;
    } else if (p.scoring == Scoring::kSigmoid) {
      for (int e = 0; e < E; ++e) s[e] = 1.0 / (1.0 + std::exp(-double(lg[e])));
    } else {
      for (int e = 0; e < E; ++e) s[e] = lg[e];
    }
    for (int e = 0; e < E; ++e) c[e] = s[e] + (bias ? bias[e] : 0.0);
    if (p.num_groups > 1) {
      std::vector<std::pair<double, int>> groups;
      for (int g = 0; g < p.num_groups; ++g) {
        std::vector<double> v(c.begin() + g * gs, c.begin() + (g + 1) * gs);
        std::sort(v.rbegin(), v.rend());
        groups.push_back({p.group_score == GroupScore::kMax ? v[0] : v[0] + v[1], g});
      }
      std::stable_sort(groups.begin(), groups.end(),
                       [](auto a, auto b) { return a.first > b.first; });
      for (int i = p.topk_groups; i < p.num_groups; ++i) {
        for (int e = 0; e < gs; ++e) c[groups[i].second * gs + e] = -INFINITY;
      }
    }
    std::vector<int> order(E);
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return c[a] > c[b]; });
    std::vector<double> wt(k);
    for (int j = 0; j < k; ++j) wt[j] = s[order[j]];
    if (p.scoring == Scoring::kSoftmaxOverTopK) {
      double mx = wt[0], sum = 0;
      for (double& v : wt) sum += std::exp(v - mx);
      for (double& v : wt) v = std::exp(v - mx) / sum;
    }
    double sum = std::accumulate(wt.begin(), wt.end(), 0.0);
    for (int j = 0; j < k; ++j) {
      double v = p.normalize ? wt[j] / (sum + p.normalize_eps) : wt[j];
      (*ids)[t * k + j] = order[j];
      (*w)[t * k + j] = static_cast<float>(v * p.scaling);
    }
  }
}

using Case = RoutingCase;

class RoutingTest : public ::testing::TestWithParam<Case> {};

TEST_P(RoutingTest, MatchesReference) {
  const Case& c = GetParam();
  ASSERT_EQ(c.params.Validate(), "");
  const int E = c.params.num_experts, k = c.params.top_k;
  for (int64_t T : {1, 7, 64}) {
    std::mt19937 rng(static_cast<uint32_t>(T * 31 + E));
    std::normal_distribution<float> nd(0.0f, 2.0f);
    std::vector<float> logits(T * E), bias(E);
    for (float& v : logits) v = nd(rng);
    for (float& v : bias) v = 0.1f * nd(rng);
    std::vector<int32_t> ids(T * k, -7), ref_ids;
    std::vector<float> w(T * k, NAN), ref_w, scores(T * E, NAN);
    RouteTopK(c.params, logits.data(), T, c.bias ? bias.data() : nullptr, ids.data(), w.data(),
              scores.data());
    ReferenceRoute(c.params, logits, T, c.bias ? bias.data() : nullptr, &ref_ids, &ref_w);
    EXPECT_EQ(ids, ref_ids) << c.name << " T=" << T;
    for (size_t i = 0; i < w.size(); ++i) {
      EXPECT_NEAR(w[i], ref_w[i], 2e-6 * std::max(1.0f, std::abs(ref_w[i]))) << c.name << " " << i;
    }
    for (int64_t t = 0; t < T; ++t) {
      float sum = 0;
      for (int e = 0; e < E; ++e) {
        ASSERT_TRUE(std::isfinite(scores[t * E + e]));
        sum += scores[t * E + e];
      }
      if (c.params.scoring != Scoring::kSigmoid) {
        EXPECT_NEAR(sum, 1.0f, 1e-5);
      }
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Families, RoutingTest, ::testing::ValuesIn(FamilyRoutingCases()),
                         [](const auto& info) { return std::string(info.param.name); });

TEST(RoutingParamsTest, ValidateNamesTheField) {
  EXPECT_NE(MakeRouting(8, 9, Scoring::kSoftmax, true).Validate().find("top_k"), std::string::npos);
  EXPECT_NE(MakeRouting(8, 2, Scoring::kSoftmax, true, 1, 3).Validate().find("num_groups"),
            std::string::npos);
  EXPECT_NE(MakeRouting(16, 8, Scoring::kSoftmax, true, 1, 4, 1).Validate().find("topk_groups"),
            std::string::npos);
}

TEST(RoutingTest, GroupLimitExcludesExperts) {
  // 4 groups of 2; group 3 holds the single largest logit but group scores (top-2 sum)
  // favour groups 0 and 1, so expert 7 must not be chosen.
  RoutingParams p = MakeRouting(8, 2, Scoring::kSigmoid, false, 1.0f, 4, 2, GroupScore::kTop2Sum);
  std::vector<float> logits = {2, 2, 1.5, 1.5, -5, -5, -5, 3};
  int32_t ids[2];
  float w[2];
  RouteTopK(p, logits.data(), 1, nullptr, ids, w, nullptr);
  EXPECT_EQ(ids[0], 0);
  EXPECT_EQ(ids[1], 1);
}

// NaN counts as -inf in the choice (routing_math.h ChoiceValue): the same ids on every
// device, whatever order comparisons with NaN would give.
TEST(RoutingTest, NanLogitsChooseTheLowestIds) {
  RoutingParams p = MakeRouting(8, 2, Scoring::kSoftmax, true);
  std::vector<float> logits(8, NAN);
  int32_t ids[2] = {-1, -1};
  float w[2];
  RouteTopK(p, logits.data(), 1, nullptr, ids, w, nullptr);
  EXPECT_EQ(ids[0], 0);
  EXPECT_EQ(ids[1], 1);
  // Softmax: one NaN logit makes every probability NaN, so again the lowest ids.
  logits = {1, 5, NAN, 4, 0, 0, 0, 0};
  RouteTopK(p, logits.data(), 1, nullptr, ids, w, nullptr);
  EXPECT_EQ(ids[0], 0);
  EXPECT_EQ(ids[1], 1);
}

TEST(RoutingTest, ANanScoreIsNeverChosenOverANumber) {
  // Sigmoid scores are per expert: the NaN one ranks last, the others as usual. A NaN
  // first (where insertion-based top-k would keep it) and last.
  RoutingParams p = MakeRouting(6, 3, Scoring::kSigmoid, true);
  for (const std::vector<float>& logits :
       {std::vector<float>{NAN, 3, 1, 2, -1, 0}, std::vector<float>{3, 1, 2, -1, 0, NAN}}) {
    int32_t ids[3];
    float w[3];
    RouteTopK(p, logits.data(), 1, nullptr, ids, w, nullptr);
    const int32_t shift = std::isnan(logits[0]) ? 1 : 0;
    EXPECT_EQ(ids[0], 0 + shift);
    EXPECT_EQ(ids[1], 2 + shift);
    EXPECT_EQ(ids[2], 1 + shift);
  }
  // Group-limited (DeepSeek-V3): a group whose scores are NaN is never a top group.
  RoutingParams g = MakeRouting(8, 2, Scoring::kSigmoid, false, 1.0f, 4, 2, GroupScore::kTop2Sum);
  std::vector<float> logits = {NAN, NAN, 1, 1, 2, 2, -3, -3};
  int32_t ids[2];
  float w[2];
  RouteTopK(g, logits.data(), 1, nullptr, ids, w, nullptr);
  EXPECT_EQ(ids[0], 4);
  EXPECT_EQ(ids[1], 5);
}

}  // namespace
}  // namespace moemesh
