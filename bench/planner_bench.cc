// planner_bench: the placement planner (services/mesh/planner) at DeepSeek-V3 scale against
// the EPLB-style baseline (services/mesh/eplb_baseline_testing.h), in one run.
//
//   planner_bench [--rounds 6] [--repeats 7] [--drift 8] [--services 64] [--min-gain 0.10]
//
// 58 MoE layers x 256 experts x 64 services, every service allowed 1.25x its fair share of
// (layer, expert) pairs (290 slots; the baseline gets the same budget: 5 per layer per
// service). Loads: Zipf (s = 1.0 and 1.2) over a per-layer permutation of the experts;
// each round `drift` of the hottest experts of every layer trade ranks with random others.
// Round 0 starts from a contiguous placement with one replica per expert; each later round
// starts from the previous round's plan (the baseline from its own previous placement).
// Prints one JSON line per (s, round): planning time (median and max over the repeats),
// balance before and after (sum over layers of the most loaded service's load / sum of the
// means, and the worst layer's max / mean), copies and bytes moved by the planner and by the
// baseline, and the baseline's balance. An expert's weights: DeepSeek-V3 FP8, 3 matrices of
// 7168 x 2048 bytes.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <string>
#include <vector>

#include "nlohmann/json.hpp"
#include "services/base/status_macros.h"
#include "services/mesh/eplb_baseline_testing.h"
#include "services/mesh/planner.h"
#include "services/runtime/flags.h"

namespace moemesh {
namespace {

using Placement = std::map<int64_t, std::vector<std::vector<int>>>;
using Loads = std::map<int64_t, std::vector<double>>;

struct Balance {
  double ratio = 0;  // sum of per-layer max / sum of per-layer mean
  double worst = 0;  // max over layers of max / mean
};

Balance Measure(const Placement& p, const Loads& load, int services) {
  double sum_max = 0, sum_mean = 0;
  Balance b;
  for (const auto& [layer, w] : load) {
    const std::vector<double> l = ServiceLoads(p.at(layer), w, services);
    const double mx = *std::max_element(l.begin(), l.end());
    double total = 0;
    for (double x : w) total += x;
    const double mean = total / services;
    sum_max += mx;
    sum_mean += mean;
    b.worst = std::max(b.worst, mx / mean);
  }
  b.ratio = sum_max / sum_mean;
  return b;
}

absl::Status Run(const CliArgs& args) {
  ASSIGN_OR_RETURN(const int64_t rounds, args.Int("rounds", 6));
  ASSIGN_OR_RETURN(const int64_t repeats, args.Int("repeats", 7));
  ASSIGN_OR_RETURN(const int64_t drift, args.Int("drift", 8));
  ASSIGN_OR_RETURN(const int64_t services, args.Int("services", 64));
  ASSIGN_OR_RETURN(const double min_gain, args.Double("min-gain", 0.10));
  constexpr int kLayers = 58, kExperts = 256;
  constexpr int64_t kExpertBytes = 3LL * 7168 * 2048;
  const int S = static_cast<int>(services);
  const int slots_per_layer = (kExperts * 5 / 4 + S - 1) / S;  // 1.25x the fair share
  std::vector<int64_t> layers;
  for (int l = 0; l < kLayers; ++l) layers.push_back(3 + l);  // DeepSeek-V3: layers 3..60

  for (double s : {1.0, 1.2}) {
    const auto trace =
        DriftingZipfTrace(layers, kExperts, s, static_cast<int>(rounds), static_cast<int>(drift),
                          /*total_per_layer=*/1e5, /*seed=*/42);
    Placement initial;
    for (int64_t l : layers) {
      auto& p = initial[l];
      p.resize(kExperts);
      for (int e = 0; e < kExperts; ++e) p[e] = {e * S / kExperts};
    }
    Placement planner_prev = initial, baseline_prev = initial;
    for (int r = 0; r < rounds; ++r) {
      PlannerInput in;
      in.layers = layers;
      in.num_experts = kExperts;
      in.num_services = S;
      in.draining.assign(S, false);
      in.current = planner_prev;
      in.load = trace[r];
      in.expert_bytes = kExpertBytes;
      PlannerOptions opt;
      opt.expert_slots = slots_per_layer * kLayers;
      opt.min_gain = min_gain;
      std::vector<double> ms;
      Plan plan;
      for (int i = 0; i < repeats; ++i) {
        const auto start = std::chrono::steady_clock::now();
        ASSIGN_OR_RETURN(plan, PlanPlacement(in, opt));
        ms.push_back(
            std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start)
                .count());
      }
      std::sort(ms.begin(), ms.end());
      const Placement baseline = EplbBaselinePlacement(trace[r], S, slots_per_layer);
      const int64_t baseline_copies = CopiesBetween(baseline_prev, baseline);
      const Balance before = Measure(planner_prev, trace[r], S);
      const Balance after = Measure(plan.placement, trace[r], S);
      const Balance base = Measure(baseline, trace[r], S);
      int published = 0;
      for (const auto& [l, lp] : plan.layers) published += lp.published ? 1 : 0;
      nlohmann::json j = {
          {"bench", "planner"},
          {"zipf_s", s},
          {"round", r},
          {"layers", kLayers},
          {"experts", kExperts},
          {"services", S},
          {"expert_slots", opt.expert_slots},
          {"plan_ms_median", ms[ms.size() / 2]},
          {"plan_ms_max", ms.back()},
          {"balance_before", before.ratio},
          {"worst_layer_before", before.worst},
          {"balance_after", after.ratio},
          {"worst_layer_after", after.worst},
          {"layers_published", published},
          {"copies", plan.bytes_moved / kExpertBytes},
          {"bytes_moved", plan.bytes_moved},
          {"baseline_balance", base.ratio},
          {"baseline_worst_layer", base.worst},
          {"baseline_copies", baseline_copies},
          {"baseline_bytes_moved", baseline_copies * kExpertBytes},
      };
      std::printf("%s\n", j.dump().c_str());
      planner_prev = plan.placement;
      baseline_prev = baseline;
    }
  }
  return absl::OkStatus();
}

}  // namespace
}  // namespace moemesh

int main(int argc, char** argv) {
  auto args = moemesh::CliArgs::Parse(std::vector<std::string>(argv + 1, argv + argc),
                                      {"rounds", "repeats", "drift", "services", "min-gain"});
  absl::Status s = args.status();
  if (s.ok()) s = moemesh::Run(*args);
  if (!s.ok()) {
    std::fprintf(stderr, "planner_bench: %s\n", std::string(s.message()).c_str());
    return 1;
  }
  return 0;
}
