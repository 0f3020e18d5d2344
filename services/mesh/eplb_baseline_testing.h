// A BASELINE FOR COMPARISONS (planner_test, planner_bench), not used by the mesh: DeepSeek
// EPLB's rebalance_experts, global policy, one MoE layer at a time, ignoring the current
// placement. (1) Replication: every expert starts with one replica; the remaining replica
// budget (num_services * slots_per_layer - num_experts) goes, one at a time, to the expert
// with the highest load per replica. (2) Packing: replicas, heaviest (load / replicas)
// first, each onto the least loaded service with room (slots_per_layer per service). One
// adaptation: a service holds at most one replica of an expert (the mesh's routers spread an
// expert's tokens over distinct services), so an expert gets at most num_services replicas
// and a replica skips services already holding its expert; a replica that finds no such
// service with room is dropped (the others then share its load). Ties go to the lowest index.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <map>
#include <numeric>
#include <vector>

namespace moemesh {

// One layer: holders[e] = services holding expert e. Needs num_services * slots_per_layer
// >= load.size().
inline std::vector<std::vector<int>> EplbBaselineLayer(const std::vector<double>& load,
                                                       int num_services, int slots_per_layer) {
  const int E = static_cast<int>(load.size());
  std::vector<int> replicas(E, 1);
  const int budget = num_services * slots_per_layer;
  for (int i = E; i < budget; ++i) {
    int best = -1;
    for (int e = 0; e < E; ++e) {
      if (replicas[e] >= num_services) continue;
      if (best < 0 || load[e] / replicas[e] > load[best] / replicas[best]) best = e;
    }
    if (best < 0) break;
    ++replicas[best];
  }
  // Replicas by load per replica, heaviest first (a stable order: ties by expert index).
  std::vector<int> items;
  for (int e = 0; e < E; ++e) items.insert(items.end(), replicas[e], e);
  std::stable_sort(items.begin(), items.end(),
                   [&](int a, int b) { return load[a] / replicas[a] > load[b] / replicas[b]; });
  std::vector<std::vector<int>> holders(E);
  std::vector<double> service_load(num_services, 0);
  std::vector<int> count(num_services, 0);
  for (int e : items) {
    int best = -1;
    for (int s = 0; s < num_services; ++s) {
      if (count[s] >= slots_per_layer) continue;
      bool holds = false;
      for (int h : holders[e]) holds |= h == s;
      if (holds) continue;
      if (best < 0 || service_load[s] < service_load[best]) best = s;
    }
    if (best < 0) continue;  // dropped: no distinct service with room
    holders[e].push_back(best);
    service_load[best] += load[e] / replicas[e];
    ++count[best];
  }
  return holders;
}

inline std::map<int64_t, std::vector<std::vector<int>>> EplbBaselinePlacement(
    const std::map<int64_t, std::vector<double>>& load, int num_services, int slots_per_layer) {
  std::map<int64_t, std::vector<std::vector<int>>> out;
  for (const auto& [layer, w] : load)
    out[layer] = EplbBaselineLayer(w, num_services, slots_per_layer);
  return out;
}

// (layer, expert, service) triples `next` holds that `prev` does not: the copies that going
// from prev to next costs.
inline int64_t CopiesBetween(const std::map<int64_t, std::vector<std::vector<int>>>& prev,
                             const std::map<int64_t, std::vector<std::vector<int>>>& next) {
  int64_t copies = 0;
  for (const auto& [layer, experts] : next) {
    auto p = prev.find(layer);
    for (size_t e = 0; e < experts.size(); ++e) {
      for (int s : experts[e]) {
        bool had = false;
        if (p != prev.end() && e < p->second.size()) {
          for (int h : p->second[e]) had |= h == s;
        }
        copies += had ? 0 : 1;
      }
    }
  }
  return copies;
}

// Recorded-style skewed traces for the comparisons: per layer, Zipf loads (the expert of
// rank k gets k^-s of the layer's total) over a per-layer permutation of the experts; each
// round, `drift` of the hottest experts trade ranks with random others (the hot set moves)
// and every load is scaled by a factor in [0.95, 1.05] (window noise). SplitMix64, so the
// same seed gives the same trace everywhere.
struct TraceRng {
  uint64_t state;
  uint64_t Next() {
    uint64_t z = (state += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
  }
  double Uniform() { return static_cast<double>(Next() >> 11) * 0x1.0p-53; }  // [0, 1)
  int Below(int n) { return static_cast<int>(Next() % static_cast<uint64_t>(n)); }
};

inline std::vector<std::map<int64_t, std::vector<double>>> DriftingZipfTrace(
    const std::vector<int64_t>& layers, int experts, double s, int rounds, int drift,
    double total_per_layer, uint64_t seed) {
  TraceRng rng{seed};
  std::vector<double> zipf(experts);
  double sum = 0;
  for (int k = 0; k < experts; ++k) sum += zipf[k] = std::pow(k + 1.0, -s);
  std::map<int64_t, std::vector<int>> rank_to_expert;
  for (int64_t l : layers) {
    auto& p = rank_to_expert[l];
    p.resize(experts);
    std::iota(p.begin(), p.end(), 0);
    for (int i = experts - 1; i > 0; --i) std::swap(p[i], p[rng.Below(i + 1)]);
  }
  std::vector<std::map<int64_t, std::vector<double>>> trace(rounds);
  for (int r = 0; r < rounds; ++r) {
    for (int64_t l : layers) {
      auto& p = rank_to_expert[l];
      if (r > 0) {
        for (int i = 0; i < drift; ++i) std::swap(p[rng.Below(drift * 2)], p[rng.Below(experts)]);
      }
      auto& w = trace[r][l];
      w.assign(experts, 0);
      for (int k = 0; k < experts; ++k) {
        w[p[k]] = total_per_layer * zipf[k] / sum * (0.95 + 0.1 * rng.Uniform());
      }
    }
  }
  return trace;
}

}  // namespace moemesh
