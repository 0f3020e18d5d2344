#include "services/mesh/planner.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <functional>
#include <limits>
#include <numeric>
#include <string>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "services/mesh/eplb_baseline_testing.h"

namespace moemesh {
namespace {

using Placement = std::map<int64_t, std::vector<std::vector<int>>>;

PlannerInput OneLayer(std::vector<double> load, std::vector<std::vector<int>> current,
                      int num_services) {
  PlannerInput in;
  in.layers = {3};
  in.num_experts = static_cast<int>(load.size());
  in.num_services = num_services;
  in.draining.assign(num_services, false);
  in.current[3] = std::move(current);
  in.load[3] = std::move(load);
  in.expert_bytes = 100;
  return in;
}

PlannerOptions Options(int min_replicas, int slots, double min_gain) {
  PlannerOptions o;
  o.min_replicas = min_replicas;
  o.expert_slots = slots;
  o.min_gain = min_gain;
  return o;
}

double MaxLoad(const std::vector<std::vector<int>>& holders, const std::vector<double>& load,
               int num_services) {
  const std::vector<double> l = ServiceLoads(holders, load, num_services);
  return *std::max_element(l.begin(), l.end());
}

std::string Describe(const PlannerInput& in) {
  std::string s = absl::StrCat("S=", in.num_services, " E=", in.num_experts);
  for (const auto& [l, w] : in.load) {
    absl::StrAppend(&s, " load[", l, "]={", absl::StrJoin(w, ","), "} current[", l, "]={");
    for (const auto& h : in.current.at(l)) absl::StrAppend(&s, "{", absl::StrJoin(h, ","), "}");
    absl::StrAppend(&s, "}");
  }
  return s;
}

// Checks every invariant a plan must keep: min_replicas on distinct non-draining services,
// slots, changes = the difference between current and placement (adds first, sorted),
// bytes.
void CheckPlanInvariants(const PlannerInput& in, const PlannerOptions& opt, const Plan& plan) {
  int active = 0;
  for (bool d : in.draining) active += d ? 0 : 1;
  const int need = std::min(opt.min_replicas, active);
  std::vector<int> used(in.num_services, 0);
  std::vector<Change> adds, removes;
  for (int64_t l : in.layers) {
    const auto& now = plan.placement.at(l);
    const auto& cur = in.current.at(l);
    ASSERT_EQ(static_cast<int>(now.size()), in.num_experts);
    for (int e = 0; e < in.num_experts; ++e) {
      std::vector<int> h = now[e];
      EXPECT_GE(static_cast<int>(h.size()), need) << "layer " << l << " expert " << e;
      std::sort(h.begin(), h.end());
      EXPECT_TRUE(std::adjacent_find(h.begin(), h.end()) == h.end()) << "replicas not distinct";
      std::vector<int> c = cur[e];
      std::sort(c.begin(), c.end());
      for (int s : h) {
        ASSERT_GE(s, 0);
        ASSERT_LT(s, in.num_services);
        EXPECT_FALSE(in.draining[s]) << "layer " << l << " expert " << e << " on draining " << s;
        ++used[s];
        if (!std::binary_search(c.begin(), c.end(), s)) adds.push_back({l, e, s, Change::kAdd});
      }
      for (int s : c) {
        if (!std::binary_search(h.begin(), h.end(), s)) {
          removes.push_back({l, e, s, Change::kRemove});
        }
      }
    }
  }
  if (opt.expert_slots > 0) {
    for (int s = 0; s < in.num_services; ++s) {
      EXPECT_LE(used[s], opt.expert_slots) << "service " << s << " over its slots";
    }
  }
  std::vector<Change> expected = adds;
  expected.insert(expected.end(), removes.begin(), removes.end());
  EXPECT_EQ(plan.changes, expected) << "changes must be the difference, adds first, sorted";
  EXPECT_EQ(plan.bytes_moved, static_cast<int64_t>(adds.size()) * in.expert_bytes);
  EXPECT_EQ(plan.worth_publishing, !plan.changes.empty());
  for (int64_t l : in.layers) {
    const LayerPlan& lp = plan.layers.at(l);
    EXPECT_DOUBLE_EQ(lp.max_after, MaxLoad(plan.placement.at(l), in.load.at(l), in.num_services));
    EXPECT_DOUBLE_EQ(lp.max_before, MaxLoad(in.current.at(l), in.load.at(l), in.num_services));
  }
}

// ---------------------------------------------------------------------------------------
// Brute force: every placement of one layer that meets min_replicas and the slots.

struct BruteForce {
  const std::vector<double>& w;
  int S, need, slots;
  std::vector<bool> draining;
  std::vector<int> masks;  // holder sets allowed for one expert
  std::vector<double> load;
  std::vector<int> used;
  double best = std::numeric_limits<double>::infinity();

  double Solve() {
    for (int mask = 1; mask < (1 << S); ++mask) {
      bool ok = __builtin_popcount(mask) >= need;
      for (int s = 0; s < S; ++s) ok &= !((mask >> s & 1) && draining[s]);
      if (ok) masks.push_back(mask);
    }
    load.assign(S, 0);
    used.assign(S, 0);
    Recurse(0, 0);
    return best;
  }
  void Recurse(size_t e, double current_max) {
    if (current_max >= best) return;  // loads only grow
    if (e == w.size()) {
      best = current_max;
      return;
    }
    for (int mask : masks) {
      bool fits = true;
      for (int s = 0; s < S; ++s) fits &= !((mask >> s & 1) && slots > 0 && used[s] >= slots);
      if (!fits) continue;
      const double c = w[e] / __builtin_popcount(mask);
      double mx = current_max;
      for (int s = 0; s < S; ++s) {
        if (mask >> s & 1) {
          load[s] += c;
          ++used[s];
          mx = std::max(mx, load[s]);
        }
      }
      Recurse(e + 1, mx);
      for (int s = 0; s < S; ++s) {
        if (mask >> s & 1) {
          load[s] -= c;
          --used[s];
        }
      }
    }
  }
};

struct SmallCase {
  PlannerInput in;
  PlannerOptions opt;
};

// A random one-layer case: 4-6 experts, 2-3 services (sometimes one draining), loads
// integer or continuous, slots between tight and loose, a random current placement that
// fits the slots (some experts lost, some replicated).
SmallCase RandomSmallCase(uint64_t seed) {
  TraceRng rng{seed};
  SmallCase c;
  const int E = 4 + rng.Below(3);
  const int S = 2 + rng.Below(2);
  c.opt.min_replicas = rng.Below(4) == 0 ? 2 : 1;
  c.opt.min_gain = 0;
  std::vector<bool> draining(S, false);
  if (S == 3 && rng.Below(5) == 0) draining[rng.Below(S)] = true;
  const int active = S - static_cast<int>(std::count(draining.begin(), draining.end(), true));
  const int need = std::min(c.opt.min_replicas, active);
  const int min_slots = (E * need + active - 1) / active;
  c.opt.expert_slots = rng.Below(4) == 0 ? 0 : min_slots + rng.Below(3);
  std::vector<double> w(E);
  const bool integers = rng.Below(2) == 0;
  for (double& x : w) x = integers ? rng.Below(21) : std::pow(rng.Uniform(), 2) * 100;
  std::vector<std::vector<int>> current(E);
  std::vector<int> used(S, 0);
  const int cap = c.opt.expert_slots > 0 ? c.opt.expert_slots : E;
  for (int e = 0; e < E; ++e) {
    const int want = rng.Below(6) == 0 ? 0 : 1 + (rng.Below(3) == 0 ? 1 : 0);
    for (int k = 0; k < want; ++k) {
      const int s = rng.Below(S);
      if (used[s] >= cap ||
          std::find(current[e].begin(), current[e].end(), s) != current[e].end()) {
        continue;
      }
      current[e].push_back(s);
      ++used[s];
    }
  }
  c.in = OneLayer(w, current, S);
  c.in.draining = draining;
  return c;
}

// The brute-force optimum of a small case's most loaded service.
double Optimum(const SmallCase& c) {
  const int active =
      static_cast<int>(std::count(c.in.draining.begin(), c.in.draining.end(), false));
  BruteForce bf{c.in.load.at(3),
                c.in.num_services,
                std::min(c.opt.min_replicas, active),
                c.opt.expert_slots,
                c.in.draining,
                {},
                {},
                {}};
  return bf.Solve();
}

TEST(PlannerTest, MatchesBruteForceOptimumOnSmallCases) {
  constexpr int kCases = 600;
  int equal = 0;
  for (int seed = 0; seed < kCases; ++seed) {
    SmallCase c = RandomSmallCase(seed);
    auto plan = PlanPlacement(c.in, c.opt);
    ASSERT_TRUE(plan.ok()) << plan.status() << " seed " << seed;
    CheckPlanInvariants(c.in, c.opt, *plan);
    const double opt = Optimum(c);
    const double got = plan->layers.at(3).max_after;
    EXPECT_GE(got, opt - 1e-9 * std::max(1.0, opt)) << "better than optimal? seed " << seed;
    if (std::abs(got - opt) <= 1e-9 * std::max(1.0, opt)) {
      ++equal;
    } else {
      std::printf("seed %d: planner %.6g optimum %.6g slots %d min_replicas %d %s\n", seed, got,
                  opt, c.opt.expert_slots, c.opt.min_replicas, Describe(c.in).c_str());
    }
  }
  EXPECT_EQ(equal, kCases);
}

TEST(PlannerTest, GreedyAloneIsCloseToTheOptimum) {
  constexpr int kCases = 600;
  double worst = 1, sum = 0;
  int optimal = 0;
  for (int seed = 0; seed < kCases; ++seed) {
    SmallCase c = RandomSmallCase(seed);
    c.opt.exact_search_nodes = 0;
    auto plan = PlanPlacement(c.in, c.opt);
    ASSERT_TRUE(plan.ok()) << plan.status() << " seed " << seed;
    CheckPlanInvariants(c.in, c.opt, *plan);
    const double opt = Optimum(c);
    const double got = plan->layers.at(3).max_after;
    EXPECT_GE(got, opt - 1e-9 * std::max(1.0, opt)) << "better than optimal? seed " << seed;
    if (got <= opt + 1e-9 * std::max(1.0, opt)) ++optimal;
    if (opt > 0) worst = std::max(worst, got / opt);
    sum += opt > 0 ? got / opt : 1;
  }
  std::printf("greedy alone: %d of %d optimal, mean %.4f, worst %.4f x the optimum\n", optimal,
              kCases, sum / kCases, worst);
  // Measured: 305 of 600 optimal, mean 1.018, worst 1.185; the exact search closes the gap
  // on layers this small (previous test).
  EXPECT_LE(sum / kCases, 1.03);
  EXPECT_LE(worst, 1.25);
  EXPECT_GE(optimal, kCases * 4 / 10);
}

// ---------------------------------------------------------------------------------------
// Against the EPLB-style greedy on recorded-style skewed traces.

struct TraceResult {
  double balance = 0;  // sum over layers and rounds of max / sum of means (>= 1)
  int64_t copies = 0;
};

// Runs `rounds` rounds of a drifting Zipf trace: the planner from its previous plan, the
// baseline from its own previous placement, both with slots_per_layer * layers slots.
void CompareWithEplb(int layers_n, int experts, int services, int slots_per_layer, double zipf,
                     int rounds, double min_gain, TraceResult* planner, TraceResult* baseline) {
  std::vector<int64_t> layers;
  for (int l = 0; l < layers_n; ++l) layers.push_back(1 + l);
  const auto trace = DriftingZipfTrace(layers, experts, zipf, rounds, /*drift=*/4, 1e4, 7);
  Placement initial;
  for (int64_t l : layers) {
    auto& p = initial[l];
    p.resize(experts);
    for (int e = 0; e < experts; ++e) p[e] = {e * services / experts};
  }
  Placement prev = initial, base_prev = initial;
  double sum_max = 0, sum_mean = 0, base_sum_max = 0;
  for (int r = 0; r < rounds; ++r) {
    PlannerInput in;
    in.layers = layers;
    in.num_experts = experts;
    in.num_services = services;
    in.draining.assign(services, false);
    in.current = prev;
    in.load = trace[r];
    in.expert_bytes = 1;
    PlannerOptions opt;
    opt.expert_slots = slots_per_layer * layers_n;
    opt.min_gain = min_gain;
    auto plan = PlanPlacement(in, opt);
    ASSERT_TRUE(plan.ok()) << plan.status();
    CheckPlanInvariants(in, opt, *plan);
    const Placement base = EplbBaselinePlacement(trace[r], services, slots_per_layer);
    planner->copies += plan->bytes_moved;
    baseline->copies += CopiesBetween(base_prev, base);
    for (int64_t l : layers) {
      const auto& w = trace[r].at(l);
      sum_max += MaxLoad(plan->placement.at(l), w, services);
      base_sum_max += MaxLoad(base.at(l), w, services);
      sum_mean += std::accumulate(w.begin(), w.end(), 0.0) / services;
    }
    prev = plan->placement;
    base_prev = base;
  }
  planner->balance = sum_max / sum_mean;
  baseline->balance = base_sum_max / sum_mean;
}

// With min_gain 0 (the comparison is of plans, not of when to publish them): the planner
// starts from where the experts are, the baseline reshuffles every round.
TEST(PlannerTest, MatchesEplbBaselineBalanceWithFewerCopiesOnSkewedTraces) {
  struct Case {
    int layers, experts, services, slots_per_layer;
    double zipf;
  };
  // Mixtral-like (8 experts on 4 services), Qwen-like (64 on 8) and a DeepSeek-like slice
  // (256 on 32), each with 1.25x to 2x the fair share of slots.
  for (const Case& c : {Case{4, 8, 4, 4, 1.0}, Case{6, 64, 8, 10, 1.0}, Case{6, 64, 8, 10, 1.2},
                        Case{4, 256, 32, 10, 1.0}, Case{4, 256, 32, 10, 1.2}}) {
    SCOPED_TRACE(absl::StrCat(c.layers, " layers x ", c.experts, " experts on ", c.services,
                              " services, zipf ", c.zipf));
    TraceResult planner, baseline;
    CompareWithEplb(c.layers, c.experts, c.services, c.slots_per_layer, c.zipf, 5, 0.0, &planner,
                    &baseline);
    std::printf("%d x %d on %d, zipf %.1f: planner balance %.4f copies %ld, EPLB %.4f copies %ld\n",
                c.layers, c.experts, c.services, c.zipf, planner.balance,
                static_cast<long>(planner.copies), baseline.balance,
                static_cast<long>(baseline.copies));
    // Equal balance within the planner's similar-plan margin (2% of the mean: it keeps a
    // plan that copies less when another is at most that much better), fewer copies.
    // Measured (min_gain 0): 1.028 vs 1.011 on 8 experts, otherwise within 0.0003.
    EXPECT_LE(planner.balance, baseline.balance + 0.02);
    EXPECT_LT(planner.copies, baseline.copies);
  }
}

// Tight slots (1.25x the fair share over all layers, DeepSeek-V3 scale): the layers planned
// first must leave the later ones their share of the free slots, so that every layer is
// balanced, not only the most imbalanced ones (without the per-layer budget, two layers
// stayed at 10.3x their mean).
TEST(PlannerTest, EveryLayerGetsItsShareOfTightSlots) {
  constexpr int kLayers = 58, kExperts = 256, kServices = 64;  // DeepSeek-V3 scale
  std::vector<int64_t> layers;
  for (int l = 0; l < kLayers; ++l) layers.push_back(l);
  const auto trace = DriftingZipfTrace(layers, kExperts, 1.0, 1, 0, 1e5, 42);
  PlannerInput in;
  in.layers = layers;
  in.num_experts = kExperts;
  in.num_services = kServices;
  in.draining.assign(kServices, false);
  in.load = trace[0];
  in.expert_bytes = 1;
  for (int64_t l : layers) {
    auto& p = in.current[l];
    p.resize(kExperts);
    for (int e = 0; e < kExperts; ++e) p[e] = {e * kServices / kExperts};
  }
  const PlannerOptions opt = Options(1, kLayers * kExperts * 5 / 4 / kServices, 0.10);
  auto plan = PlanPlacement(in, opt);
  ASSERT_TRUE(plan.ok()) << plan.status();
  CheckPlanInvariants(in, opt, *plan);
  for (const auto& [l, lp] : plan->layers) {
    EXPECT_GT(lp.max_before / lp.mean, 5) << "layer " << l;
    EXPECT_LT(lp.max_after / lp.mean, 1.2) << "layer " << l;
  }
}

// ---------------------------------------------------------------------------------------
// Hysteresis, stickiness, required changes.

TEST(PlannerTest, PublishesOnlyWhenTheMaxDropsByMinGain) {
  // Service 0 carries 11, service 1 9.5; the best plan (replicating freely) reaches the
  // mean 10.25: a 6.8% drop.
  const PlannerInput in = OneLayer({10, 9, 1, 0.5}, {{0}, {1}, {0}, {1}}, 2);
  auto held = PlanPlacement(in, Options(1, 0, 0.10));
  ASSERT_TRUE(held.ok()) << held.status();
  EXPECT_FALSE(held->worth_publishing);
  EXPECT_TRUE(held->changes.empty());
  EXPECT_EQ(held->placement, in.current);
  EXPECT_DOUBLE_EQ(held->layers.at(3).max_after, 11);
  EXPECT_FALSE(held->layers.at(3).published);

  auto moved = PlanPlacement(in, Options(1, 0, 0.05));
  ASSERT_TRUE(moved.ok()) << moved.status();
  CheckPlanInvariants(in, Options(1, 0, 0.05), *moved);
  EXPECT_TRUE(moved->worth_publishing);
  EXPECT_TRUE(moved->layers.at(3).published);
  EXPECT_LE(moved->layers.at(3).max_after, 11 * 0.95);
}

// Over random small layers: with min_gain 0.10 a layer changes only when its max drops by
// at least 10%, and every layer that min_gain 0 would improve by less keeps its placement
// exactly (required changes aside).
TEST(PlannerTest, HysteresisHoldsOnRandomLayers) {
  int small_gains = 0, published = 0;
  for (int seed = 0; seed < 600; ++seed) {
    SmallCase c = RandomSmallCase(seed);
    c.opt.min_gain = 0;
    auto free_plan = PlanPlacement(c.in, c.opt);
    c.opt.min_gain = 0.10;
    auto plan = PlanPlacement(c.in, c.opt);
    ASSERT_TRUE(free_plan.ok() && plan.ok()) << "seed " << seed;
    const LayerPlan& lp = plan->layers.at(3);
    if (lp.required) continue;
    CheckPlanInvariants(c.in, c.opt, *plan);
    const LayerPlan& free_lp = free_plan->layers.at(3);
    if (lp.published) {
      ++published;
      EXPECT_LE(lp.max_after, lp.max_before * 0.9 + 1e-9) << "seed " << seed;
    }
    if (free_lp.max_after > free_lp.max_before * 0.9 + 1e-9) {
      if (free_lp.published) ++small_gains;
      EXPECT_FALSE(lp.published) << "seed " << seed << ": a gain under 10% was published";
      EXPECT_EQ(plan->placement, c.in.current) << "seed " << seed;
    }
  }
  // Both sides were exercised (measured: 17 small gains held back, 112 published).
  std::printf("hysteresis: %d small gains held back, %d layers published\n", small_gains,
              published);
  EXPECT_GT(small_gains, 5);
  EXPECT_GT(published, 10);
}

TEST(PlannerTest, ABalancedLayerIsLeftAlone) {
  // Already at the mean: nothing can be gained, so nothing moves, at any min_gain.
  const PlannerInput in = OneLayer({8, 2, 5, 5, 7, 3}, {{0}, {0}, {1}, {1}, {2}, {2}}, 3);
  for (double gain : {0.0, 0.10}) {
    auto plan = PlanPlacement(in, Options(1, 2, gain));
    ASSERT_TRUE(plan.ok()) << plan.status();
    EXPECT_TRUE(plan->changes.empty());
    EXPECT_EQ(plan->placement, in.current);
  }
}

TEST(PlannerTest, ExpertsThatStayPutAreNotMoved) {
  // One hot expert on service 0; the rest balanced. The plan touches the hot service's
  // experts and the receivers only: every expert of a service it neither takes from nor
  // gives to keeps its holders.
  std::vector<double> load(16, 1.0);
  load[0] = 12;
  std::vector<std::vector<int>> current(16);
  for (int e = 0; e < 16; ++e) current[e] = {e / 4};
  const PlannerInput in = OneLayer(load, current, 4);
  auto plan = PlanPlacement(in, Options(1, 6, 0.10));
  ASSERT_TRUE(plan.ok()) << plan.status();
  CheckPlanInvariants(in, Options(1, 6, 0.10), *plan);
  EXPECT_TRUE(plan->worth_publishing);
  // max 15 -> the mean is 7; a 3-way split of the hot expert and a few moves reach ~7-8.
  EXPECT_LE(plan->layers.at(3).max_after, 8.0 + 1e-9);
  int adds = 0;
  for (const Change& c : plan->changes) adds += c.kind == Change::kAdd ? 1 : 0;
  // A full reshuffle (EPLB) would copy most of the 16 experts; the planner copies a few.
  EXPECT_LE(adds, 5);
  const auto base = EplbBaselineLayer(load, 4, 6);
  EXPECT_LT(adds, CopiesBetween({{3, current}}, {{3, base}}));
}

TEST(PlannerTest, RequiredChangesIgnoreHysteresis) {
  // Service 1 drains and expert 3 is lost: both are planned even with min_gain 0.99 and no
  // load at all.
  PlannerInput in = OneLayer({0, 0, 0, 0, 0, 0}, {{0}, {1}, {2}, {}, {1}, {0}}, 3);
  in.draining[1] = true;
  PlannerOptions opt = Options(1, 0, 0.99 - 1e-9);
  auto plan = PlanPlacement(in, opt);
  ASSERT_TRUE(plan.ok()) << plan.status();
  CheckPlanInvariants(in, opt, *plan);
  EXPECT_TRUE(plan->worth_publishing);
  EXPECT_TRUE(plan->layers.at(3).required);
  const auto& p = plan->placement.at(3);
  for (int e = 0; e < 6; ++e) {
    EXPECT_EQ(p[e].size(), 1u) << "expert " << e;
    EXPECT_NE(p[e][0], 1) << "expert " << e << " left on the draining service";
  }
  // Kept where they were: 0 on 0, 2 on 2, 5 on 0.
  EXPECT_EQ(p[0], std::vector<int>{0});
  EXPECT_EQ(p[2], std::vector<int>{2});
  EXPECT_EQ(p[5], std::vector<int>{0});
  // The three homeless experts (1, 3, 4) spread: each service ends with three.
  const std::vector<double> zero(6, 0);
  std::vector<int> count(3, 0);
  for (const auto& h : p) ++count[h[0]];
  EXPECT_EQ(count, (std::vector<int>{3, 0, 3}));
}

TEST(PlannerTest, AnEmptyPlacementWithoutLoadIsSpreadEvenly) {
  // A fresh controller: nothing placed, nothing measured. Every service gets its share.
  for (int min_replicas : {1, 2}) {
    PlannerInput in = OneLayer(std::vector<double>(16, 0), std::vector<std::vector<int>>(16), 4);
    in.layers = {3, 4};
    in.current[4] = in.current[3];
    in.load[4] = in.load[3];
    PlannerOptions opt = Options(min_replicas, 0, 0.10);
    auto plan = PlanPlacement(in, opt);
    ASSERT_TRUE(plan.ok()) << plan.status();
    CheckPlanInvariants(in, opt, *plan);
    for (int64_t l : in.layers) {
      std::vector<int> count(4, 0);
      for (const auto& h : plan->placement.at(l)) {
        for (int s : h) ++count[s];
      }
      EXPECT_EQ(count, std::vector<int>(4, 4 * min_replicas)) << "layer " << l;
    }
  }
}

TEST(PlannerTest, MinReplicasOnDistinctServicesWithinSlots) {
  std::vector<double> load(12);
  for (int e = 0; e < 12; ++e) load[e] = 1 + e * e;
  std::vector<std::vector<int>> current(12);
  for (int e = 0; e < 12; ++e) current[e] = {e % 3};
  PlannerInput in = OneLayer(load, current, 3);
  const PlannerOptions opt = Options(2, 9, 0.10);
  auto plan = PlanPlacement(in, opt);
  ASSERT_TRUE(plan.ok()) << plan.status();
  CheckPlanInvariants(in, opt, *plan);  // >= 2 distinct holders, <= 9 per service
  for (const auto& h : plan->placement.at(3)) EXPECT_GE(h.size(), 2u);
}

TEST(PlannerTest, SameInputSamePlan) {
  TraceRng rng{99};
  PlannerInput in;
  in.num_experts = 64;
  in.num_services = 8;
  in.draining.assign(8, false);
  in.expert_bytes = 10;
  for (int64_t l : {7, 3, 5}) {
    in.layers.push_back(l);
    auto& w = in.load[l];
    auto& c = in.current[l];
    for (int e = 0; e < 64; ++e) {
      w.push_back(std::pow(rng.Uniform(), 4) * 1000);
      c.push_back({rng.Below(8)});
    }
  }
  const PlannerOptions opt = Options(1, 40, 0.10);
  auto first = PlanPlacement(in, opt);
  ASSERT_TRUE(first.ok()) << first.status();
  EXPECT_TRUE(first->worth_publishing);
  for (int i = 0; i < 3; ++i) {
    PlannerInput again = in;
    std::reverse(again.layers.begin(), again.layers.end());
    auto next = PlanPlacement(again, opt);
    ASSERT_TRUE(next.ok()) << next.status();
    EXPECT_EQ(next->placement, first->placement);
    EXPECT_EQ(next->changes, first->changes);
    EXPECT_EQ(next->bytes_moved, first->bytes_moved);
  }
}

// ---------------------------------------------------------------------------------------
// Errors.

TEST(PlannerTest, MalformedInputIsRefusedNamingTheField) {
  const PlannerInput good = OneLayer({1, 2}, {{0}, {1}}, 2);
  struct Bad {
    std::function<void(PlannerInput&, PlannerOptions&)> edit;
    std::string names;
  };
  const std::vector<Bad> cases = {
      {[](PlannerInput&, PlannerOptions& o) { o.min_replicas = 0; }, "min_replicas"},
      {[](PlannerInput&, PlannerOptions& o) { o.expert_slots = -1; }, "expert_slots"},
      {[](PlannerInput&, PlannerOptions& o) { o.min_gain = 1; }, "min_gain"},
      {[](PlannerInput&, PlannerOptions& o) { o.min_gain = std::nan(""); }, "min_gain"},
      {[](PlannerInput& i, PlannerOptions&) { i.num_experts = 0; }, "num_experts"},
      {[](PlannerInput& i, PlannerOptions&) { i.draining.push_back(false); }, "draining"},
      {[](PlannerInput& i, PlannerOptions&) { i.layers.push_back(3); }, "appears twice"},
      {[](PlannerInput& i, PlannerOptions&) { i.current[3][0] = {2}; }, "out of range"},
      {[](PlannerInput& i, PlannerOptions&) {
         i.current[3][0] = {1, 1};
       },
       "current[3][0]"},
      {[](PlannerInput& i, PlannerOptions&) { i.current[3].pop_back(); }, "current[3]"},
      {[](PlannerInput& i, PlannerOptions&) { i.load[3][1] = -1; }, "load[3][1]"},
      {[](PlannerInput& i, PlannerOptions&) { i.load[3][1] = INFINITY; }, "load[3][1]"},
      {[](PlannerInput& i, PlannerOptions&) { i.load.erase(3); }, "load"},
      {[](PlannerInput& i, PlannerOptions&) { i.current[9] = {}; }, "layer 9"},
  };
  for (const Bad& b : cases) {
    PlannerInput in = good;
    PlannerOptions opt;
    b.edit(in, opt);
    auto plan = PlanPlacement(in, opt);
    ASSERT_FALSE(plan.ok()) << "expected an error naming " << b.names;
    EXPECT_EQ(plan.status().code(), absl::StatusCode::kInvalidArgument) << plan.status();
    EXPECT_NE(plan.status().message().find(b.names), std::string::npos) << plan.status();
  }
}

TEST(PlannerTest, ImpossibleConstraintsAreAFailedPrecondition) {
  PlannerInput all_draining = OneLayer({1, 2}, {{0}, {1}}, 2);
  all_draining.draining = {true, true};
  auto a = PlanPlacement(all_draining, PlannerOptions{});
  EXPECT_EQ(a.status().code(), absl::StatusCode::kFailedPrecondition) << a.status();
  EXPECT_NE(a.status().message().find("draining"), std::string::npos) << a.status();

  const PlannerInput in = OneLayer({1, 2, 3, 4, 5}, {{0}, {1}, {0}, {1}, {0}}, 2);
  auto b = PlanPlacement(in, Options(2, 4, 0.1));  // 5 experts x 2 replicas > 2 x 4 slots
  EXPECT_EQ(b.status().code(), absl::StatusCode::kFailedPrecondition) << b.status();
  EXPECT_NE(b.status().message().find("expert_slots=4"), std::string::npos) << b.status();
}

}  // namespace
}  // namespace moemesh
