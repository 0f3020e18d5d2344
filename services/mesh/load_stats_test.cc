#include "services/mesh/load_stats.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <thread>

namespace moemesh {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;
using Clock = ExpertLoadWindow::Clock;
using std::chrono::milliseconds;
using std::chrono::seconds;

TEST(ExpertLoadWindowTest, EmptyWindowReportsNoLoad) {
  const auto t0 = Clock::now();
  ExpertLoadWindow w(4, seconds(60), 12, t0);
  const auto st = w.Snapshot(t0 + seconds(1));
  EXPECT_EQ(st.tokens, 0);
  EXPECT_THAT(st.counts, ElementsAre(0, 0, 0, 0));
  EXPECT_EQ(st.imbalance, 0);
  EXPECT_EQ(st.balance_statistic, 0);
  EXPECT_TRUE(st.mean_probability.empty());
  EXPECT_DOUBLE_EQ(st.seconds, 1.0);
}

TEST(ExpertLoadWindowTest, ImbalanceRateAndBalanceStatistic) {
  const auto t0 = Clock::now();
  ExpertLoadWindow w(4, seconds(60), 12, t0);
  // 10 tokens, top-2: 20 assignments, 14 of them to expert 0.
  const int64_t counts[4] = {14, 2, 2, 2};
  const double probs[4] = {7.0, 1.0, 1.0, 1.0};  // mean probability 0.7, 0.1, 0.1, 0.1
  w.Add(10, counts, probs, t0 + seconds(2));
  const auto st = w.Snapshot(t0 + seconds(10));
  EXPECT_EQ(st.tokens, 10);
  EXPECT_THAT(st.counts, ElementsAre(14, 2, 2, 2));
  EXPECT_DOUBLE_EQ(st.seconds, 10.0);
  EXPECT_DOUBLE_EQ(st.rate[0], 1.4);
  EXPECT_DOUBLE_EQ(st.imbalance, 14.0 / 5.0);  // max / mean
  ASSERT_EQ(st.mean_probability.size(), 4u);
  EXPECT_DOUBLE_EQ(st.mean_probability[0], 0.7);
  // E · Σ f_i P_i = 4 · (0.7·0.7 + 3 · 0.1·0.1)
  EXPECT_NEAR(st.balance_statistic, 4 * (0.7 * 0.7 + 3 * 0.1 * 0.1), 1e-12);
}

TEST(ExpertLoadWindowTest, UniformLoadIsBalanced) {
  const auto t0 = Clock::now();
  ExpertLoadWindow w(8, seconds(60), 12, t0);
  const std::vector<int64_t> counts(8, 5);
  const std::vector<double> probs(8, 20.0 / 8);
  w.Add(20, counts.data(), probs.data(), t0);
  const auto st = w.Snapshot(t0 + seconds(1));
  EXPECT_DOUBLE_EQ(st.imbalance, 1.0);
  EXPECT_NEAR(st.balance_statistic, 1.0, 1e-12);
}

TEST(ExpertLoadWindowTest, OldSlicesLeaveTheWindow) {
  const auto t0 = Clock::now();
  ExpertLoadWindow w(2, seconds(60), 12, t0);  // 5 s slices
  const int64_t hot0[2] = {9, 1}, hot1[2] = {1, 9};
  w.Add(5, hot0, nullptr, t0 + seconds(1));
  w.Add(5, hot1, nullptr, t0 + seconds(40));
  auto st = w.Snapshot(t0 + seconds(50));
  EXPECT_THAT(st.counts, ElementsAre(10, 10));
  EXPECT_DOUBLE_EQ(st.seconds, 50.0);
  // 66 s: the slice holding t0+1s (0–5 s) is out of the 60 s window.
  st = w.Snapshot(t0 + seconds(66));
  EXPECT_THAT(st.counts, ElementsAre(1, 9));
  EXPECT_EQ(st.tokens, 5);
  EXPECT_NEAR(st.seconds, 60.0, 5.0);
  // A write into a reused ring slot clears what it held.
  const int64_t one[2] = {1, 0};
  w.Add(1, one, nullptr, t0 + seconds(121));
  st = w.Snapshot(t0 + seconds(121));
  EXPECT_THAT(st.counts, ElementsAre(1, 0));
  // Nothing measured: no probabilities, no balance statistic, but an imbalance.
  EXPECT_TRUE(st.mean_probability.empty());
  EXPECT_EQ(st.balance_statistic, 0);
  EXPECT_DOUBLE_EQ(st.imbalance, 2.0);
}

TEST(ExpertLoadWindowTest, ConcurrentAddsAreAllCounted) {
  ExpertLoadWindow w(3, seconds(600));
  const int64_t c[3] = {1, 2, 3};
  std::vector<std::thread> threads;
  for (int i = 0; i < 4; ++i) {
    threads.emplace_back([&] {
      for (int j = 0; j < 10000; ++j) w.Add(1, c, nullptr);
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_THAT(w.Snapshot().counts, ElementsAre(40000, 80000, 120000));
}

MoeModelConfig Config(int64_t layers, int64_t experts) {
  MoeModelConfig c;
  c.num_layers = layers;
  c.num_experts = experts;
  c.top_k = 2;
  c.hidden_size = 8;
  return c;
}

TEST(ExpertSeriesSelectionTest, AutoKeepsSmallModelsPerLayerAndSumsLargeOnes) {
  auto mixtral = ExpertSeriesSelection::Parse("auto", Config(32, 8));
  ASSERT_TRUE(mixtral.ok());
  EXPECT_FALSE(mixtral->summed());
  EXPECT_EQ(mixtral->layers().size(), 32u);
  EXPECT_EQ(mixtral->LayerLabel(31), "31");

  MoeModelConfig deepseek = Config(61, 256);
  deepseek.family = ModelFamily::kDeepseekV3;
  deepseek.first_k_dense_replace = 3;
  auto big = ExpertSeriesSelection::Parse("auto", deepseek);
  ASSERT_TRUE(big.ok());
  EXPECT_TRUE(big->summed());
  EXPECT_EQ(big->LayerLabel(10), "all");
  // Summed: 256 series, well under the budget.
}

TEST(ExpertSeriesSelectionTest, ListedLayersOnly) {
  auto s = ExpertSeriesSelection::Parse("3, 1", Config(4, 8));
  ASSERT_TRUE(s.ok()) << s.status();
  EXPECT_THAT(s->layers(), ElementsAre(1, 3));
  EXPECT_EQ(s->LayerLabel(1), "1");
  EXPECT_EQ(s->LayerLabel(2), std::nullopt);
  EXPECT_TRUE(ExpertSeriesSelection::Parse("all", Config(4, 8))->LayerLabel(2).has_value());
  EXPECT_EQ(ExpertSeriesSelection::Parse("sum", Config(4, 8))->LayerLabel(2), "all");
}

TEST(ExpertSeriesSelectionTest, BadSpecsNameTheProblem) {
  auto word = ExpertSeriesSelection::Parse("some", Config(4, 8));
  EXPECT_EQ(word.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(word.status().message(), HasSubstr("'some'"));
  auto layer = ExpertSeriesSelection::Parse("1,9", Config(4, 8));
  EXPECT_EQ(layer.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(layer.status().message(), HasSubstr("9"));
}

}  // namespace
}  // namespace moemesh
