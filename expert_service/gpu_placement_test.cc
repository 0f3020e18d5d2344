// The local GPU placement of an expert service with several GPUs: new experts spread
// evenly and placed ones stay; balancing lowers the hottest GPU's load without putting
// more experts on a GPU than an even spread, within its budget of moves.
#include "expert_service/gpu_placement.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <random>

namespace moemesh {
namespace {

std::vector<double> PerDevice(const std::vector<int>& device, const std::vector<double>& load,
                              int g) {
  std::vector<double> per(g, 0);
  for (size_t i = 0; i < device.size(); ++i) per[device[i]] += load[i];
  return per;
}

std::vector<int> Apply(std::vector<int> device, const std::vector<LocalMove>& moves) {
  for (const LocalMove& m : moves) {
    EXPECT_EQ(device[m.expert], m.from);
    device[m.expert] = m.to;
  }
  return device;
}

TEST(AssignLocalExpertsTest, NewExpertsSpreadEvenlyAndPlacedOnesStay) {
  EXPECT_EQ(AssignLocalExperts({-1, -1, -1, -1, -1, -1, -1, -1}, 4),
            (std::vector<int>{0, 1, 2, 3, 0, 1, 2, 3}));
  // GPU 0 holds three already: the new ones fill the others first.
  EXPECT_EQ(AssignLocalExperts({0, 0, 0, -1, -1, -1}, 3), (std::vector<int>{0, 0, 0, 1, 2, 1}));
  EXPECT_EQ(AssignLocalExperts({2, -1}, 3), (std::vector<int>{2, 0}));
  EXPECT_EQ(AssignLocalExperts({-1, -1, -1}, 1), (std::vector<int>{0, 0, 0}));
  EXPECT_TRUE(AssignLocalExperts({}, 8).empty());
}

TEST(BalanceLocalExpertsTest, EvenLoadOrOneGpuNeedsNoMoves) {
  EXPECT_TRUE(BalanceLocalExperts({0, 1, 0, 1}, {5, 5, 5, 5}, 2, 0.1, 8).empty());
  EXPECT_TRUE(BalanceLocalExperts({0, 0, 0}, {9, 1, 1}, 1, 0.1, 8).empty());
  EXPECT_TRUE(BalanceLocalExperts({0, 1}, {0, 0}, 2, 0.1, 8).empty());
}

TEST(BalanceLocalExpertsTest, TwoHotExpertsOnOneGpuAreSeparatedBySwapping) {
  // 8 experts round-robin on 2 GPUs (0,2,4,6 on GPU 0); experts 0 and 2 are hot.
  const std::vector<int> device = {0, 1, 0, 1, 0, 1, 0, 1};
  const std::vector<double> load = {100, 1, 100, 1, 1, 1, 1, 1};
  const std::vector<LocalMove> moves = BalanceLocalExperts(device, load, 2, 0.1, 8);
  ASSERT_FALSE(moves.empty());
  const std::vector<int> after = Apply(device, moves);
  const std::vector<double> per = PerDevice(after, load, 2);
  EXPECT_LE(std::max(per[0], per[1]), 1.1 * 103) << per[0] << " " << per[1];
  EXPECT_NE(after[0], after[2]);
  // Counts stay at the even spread: memory that fitted still fits.
  EXPECT_EQ(std::count(after.begin(), after.end(), 0), 4);
}

TEST(BalanceLocalExpertsTest, RandomSkewsGetBetterWithinBudgetAndCap) {
  std::mt19937 rng(7);
  for (int round = 0; round < 200; ++round) {
    const int g = 2 + static_cast<int>(rng() % 7), n = g + static_cast<int>(rng() % 60);
    std::vector<int> current(n, -1);
    const std::vector<int> device = AssignLocalExperts(current, g);
    std::vector<double> load(n);
    std::exponential_distribution<double> skew(0.2);
    for (double& l : load) l = skew(rng) * skew(rng);
    const int budget = 1 + static_cast<int>(rng() % 10);
    const std::vector<LocalMove> moves = BalanceLocalExperts(device, load, g, 0.05, budget);
    EXPECT_LE(static_cast<int>(moves.size()), budget);
    const std::vector<int> after = Apply(device, moves);
    const std::vector<double> before_per = PerDevice(device, load, g),
                              after_per = PerDevice(after, load, g);
    const double before_max = *std::max_element(before_per.begin(), before_per.end());
    const double after_max = *std::max_element(after_per.begin(), after_per.end());
    EXPECT_LE(after_max, before_max + 1e-9);
    if (!moves.empty()) {
      EXPECT_LT(after_max, before_max);
    }
    const int cap = (n + g - 1) / g;
    for (int d = 0; d < g; ++d) EXPECT_LE(std::count(after.begin(), after.end(), d), cap);
  }
}

TEST(BalanceLocalExpertsTest, MalformedInputGivesNoMoves) {
  EXPECT_TRUE(BalanceLocalExperts({0, 1}, {1}, 2, 0.1, 8).empty());
  EXPECT_TRUE(BalanceLocalExperts({}, {}, 4, 0.1, 8).empty());
  EXPECT_TRUE(BalanceLocalExperts({0, 1, 0}, {9, 1, 9}, 2, 0.1, 0).empty());
}

}  // namespace
}  // namespace moemesh
