#include "kernels/cpu/dispatch.h"

#include <gtest/gtest.h>

#include <random>
#include <vector>

namespace moemesh {
namespace {

TEST(DispatchTest, TokenChoiceGroupsByExpertInTokenOrder) {
  // 4 tokens, k=2, 3 experts.
  std::vector<int32_t> ids = {2, 0, 0, 1, 2, 1, 0, 2};
  std::vector<float> w = {.6f, .4f, .7f, .3f, .5f, .5f, .9f, .1f};
  DispatchPlan plan;
  BuildTokenChoicePlan(ids.data(), w.data(), 4, 2, 3, -1, &plan);
  EXPECT_EQ(plan.expert_offsets, (std::vector<int64_t>{0, 3, 5, 8}));
  EXPECT_EQ(plan.row_token, (std::vector<int32_t>{0, 1, 3, 1, 2, 0, 2, 3}));
  EXPECT_EQ(plan.dropped, 0);
  // Token 0 reads expert 2's first row (row 5) then expert 0's first row (row 0).
  EXPECT_EQ(plan.token_rows[0], 5);
  EXPECT_EQ(plan.token_rows[1], 0);
  EXPECT_FLOAT_EQ(plan.token_weights[0], .6f);
}

TEST(DispatchTest, CapacityDropsLaterTokens) {
  // Every token picks expert 0 first; capacity 2 admits tokens 0 and 1 only.
  std::vector<int32_t> ids = {0, 1, 0, 1, 0, 1, 0, 1};
  std::vector<float> w(8, 0.5f);
  DispatchPlan plan;
  BuildTokenChoicePlan(ids.data(), w.data(), 4, 2, 2, 2, &plan);
  EXPECT_EQ(plan.dropped, 4);
  EXPECT_EQ(plan.rows_of(0), 2);
  EXPECT_EQ(plan.rows_of(1), 2);
  EXPECT_EQ(plan.row_token, (std::vector<int32_t>{0, 1, 0, 1}));
  EXPECT_EQ(plan.token_offsets, (std::vector<int64_t>{0, 2, 4, 4, 4}));
  EXPECT_EQ(ExpertCapacity(1.0, 4, 2, 2), 4);
  EXPECT_EQ(ExpertCapacity(1.25, 10, 1, 8), 2);
}

TEST(DispatchTest, GatherCombineMatchesNaive) {
  const int64_t T = 33, H = 17;
  const int E = 5, k = 3;
  std::mt19937 rng(3);
  std::uniform_int_distribution<int> pick(0, E - 1);
  std::uniform_real_distribution<float> u(-1, 1);
  std::vector<int32_t> ids(T * k);
  std::vector<float> w(T * k), x(T * H);
  for (int64_t t = 0; t < T; ++t) {
    std::vector<int> perm = {0, 1, 2, 3, 4};
    std::shuffle(perm.begin(), perm.end(), rng);
    for (int j = 0; j < k; ++j) ids[t * k + j] = perm[j];
  }
  for (float& v : w) v = u(rng);
  for (float& v : x) v = u(rng);
  DispatchPlan plan;
  BuildTokenChoicePlan(ids.data(), w.data(), T, k, E, -1, &plan);
  std::vector<float> grouped(plan.num_rows() * H);
  GatherRows(x.data(), H, plan, 0, plan.num_rows(), grouped.data());
  // "Expert" e scales its rows by (e + 1).
  for (int e = 0; e < E; ++e) {
    for (int64_t r = plan.expert_offsets[e]; r < plan.expert_offsets[e + 1]; ++r) {
      for (int64_t h = 0; h < H; ++h) grouped[r * H + h] *= float(e + 1);
    }
  }
  std::vector<float> out(T * H, NAN);
  CombineRows(grouped.data(), H, plan, 0, T, out.data());
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t h = 0; h < H; ++h) {
      float ref = 0;
      for (int j = 0; j < k; ++j) ref += w[t * k + j] * float(ids[t * k + j] + 1) * x[t * H + h];
      ASSERT_NEAR(out[t * H + h], ref, 1e-5) << t << "," << h;
    }
  }
}

TEST(DispatchTest, ExpertChoiceTakesTopTokensPerExpert) {
  // 4 tokens, 2 experts, capacity 2.
  std::vector<float> scores = {0.9f, 0.1f, 0.2f, 0.8f, 0.7f, 0.3f, 0.6f, 0.4f};
  DispatchPlan plan;
  BuildExpertChoicePlan(scores.data(), 4, 2, 2, &plan);
  EXPECT_EQ(plan.row_token, (std::vector<int32_t>{0, 2, 1, 3}));
  EXPECT_EQ(plan.token_offsets, (std::vector<int64_t>{0, 1, 2, 3, 4}));
  EXPECT_FLOAT_EQ(plan.token_weights[plan.token_offsets[1]], 0.8f);
  std::vector<float> y = {1, 2, 3, 4};  // H = 1
  std::vector<float> out(4);
  CombineRows(y.data(), 1, plan, 0, 4, out.data());
  EXPECT_FLOAT_EQ(out[0], 0.9f * 1);
  EXPECT_FLOAT_EQ(out[1], 0.8f * 3);
  EXPECT_FLOAT_EQ(out[2], 0.7f * 2);
  EXPECT_FLOAT_EQ(out[3], 0.4f * 4);
}

TEST(DispatchTest, PlanReuseShrinksAndGrows) {
  DispatchPlan plan;
  std::vector<int32_t> big(200, 1), small = {0, 1};
  std::vector<float> w(200, 1.0f);
  BuildTokenChoicePlan(big.data(), w.data(), 100, 2, 4, -1, &plan);
  EXPECT_EQ(plan.num_rows(), 200);
  BuildTokenChoicePlan(small.data(), w.data(), 1, 2, 4, -1, &plan);
  EXPECT_EQ(plan.num_rows(), 2);
  EXPECT_EQ(plan.token_offsets.size(), 2u);
}

}  // namespace
}  // namespace moemesh
