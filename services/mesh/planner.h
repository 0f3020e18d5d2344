// PlanPlacement: the placement controller's planner. Given the current placement (which
// services hold each (MoE layer, expert)) and the load the routers measured, it returns a
// new placement and the changes that reach it.
//
// Objective, per MoE layer: the most loaded service's load, a service's load being the sum
// over the layer's experts it holds of load(e) / replicas(e) (routers spread an expert's
// tokens evenly over its replicas), as low as the constraints allow: at most expert_slots
// (layer, expert) pairs per service over all layers, at least min_replicas replicas per
// expert on distinct services, nothing on draining services. Replicas that stay put are
// kept; among improvements of similar benefit the one copying fewer weights wins; a layer
// whose most loaded service would not drop by min_gain keeps its placement (hysteresis),
// unless it has required changes (a lost expert, a missing replica, a draining service,
// a service over its slots), which are always planned. Greedy local search, not an exact
// solver: docs/planner.md gives the algorithm and the reasons for the defaults.
//
// Pure and deterministic: the same input gives the same plan (ties between equally
// loaded services go to the one holding fewer of the layer's experts, then the lowest
// index); no randomness, no clock, no locks. Errors: INVALID_ARGUMENT naming the field for
// malformed input or options; FAILED_PRECONDITION when the constraints cannot be met
// (every service draining, too few slots for min_replicas).
#pragma once

#include <cstdint>
#include <map>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace moemesh {

struct PlannerOptions {
  // Every (layer, expert) keeps at least this many replicas, on distinct services, whenever
  // that many non-draining services exist (otherwise one on each).
  int min_replicas = 1;
  // Most (layer, expert) pairs one service may hold, over all layers; 0 = unlimited.
  int expert_slots = 0;
  // Hysteresis: a layer's optimisation is published only when it lowers the layer's most
  // loaded service's load by at least this fraction. 0.10: router load windows are noisy
  // by a few percent round to round, and moving an expert copies its weights (GBs at
  // DeepSeek-V3 scale) — see docs/planner.md.
  double min_gain = 0.10;
  // Copies (replicas added where the expert was not) the optimisation may plan per layer;
  // 0 = unlimited. Required changes are never limited.
  int max_moves_per_layer = 0;
  // Small layers (a search space of at most ~2e6 placements: a handful of experts on a
  // handful of services) are finished by an exact branch and bound of at most this many
  // nodes; 0 = greedy only.
  int64_t exact_search_nodes = 1 << 21;

  absl::Status Validate() const;
};

struct PlannerInput {
  std::vector<int64_t> layers;  // MoE layers, distinct
  int num_experts = 0;          // experts per MoE layer
  int num_services = 0;         // candidate holders 0..num_services-1 (registered, ready)
  std::vector<bool> draining;   // [num_services]: hold nothing after the plan
  // current[layer][expert] = services holding it now, distinct; may be empty (a lost
  // expert, e.g. after a service died). One entry per layer of `layers`.
  std::map<int64_t, std::vector<std::vector<int>>> current;
  // load[layer][expert] = tokens routed per second (summed over the routers' windows),
  // finite and >= 0. One entry per layer of `layers`.
  std::map<int64_t, std::vector<double>> load;
  int64_t expert_bytes = 0;  // weight bytes one (layer, expert) copy costs to move
};

struct Change {
  enum Kind { kAdd, kRemove };
  int64_t layer = 0;
  int32_t expert = 0;
  int service = 0;
  Kind kind = kAdd;

  bool operator==(const Change& o) const {
    return layer == o.layer && expert == o.expert && service == o.service && kind == o.kind;
  }
};

// One layer's most loaded service before (the current placement) and after (the plan),
// and the mean over non-draining services (the lower bound of the max).
struct LayerPlan {
  double max_before = 0;
  double max_after = 0;
  double mean = 0;
  bool required = false;   // the layer had required changes
  bool published = false;  // the layer's placement changes in the plan
};

struct Plan {
  // The new placement: kept replicas in their current order, then new ones ascending.
  std::map<int64_t, std::vector<std::vector<int>>> placement;
  // Every add (by layer, expert, service), then every remove (same order). The controller
  // runs the adds first, so no expert is ever without a replica.
  std::vector<Change> changes;
  int64_t bytes_moved = 0;  // adds * expert_bytes
  std::map<int64_t, LayerPlan> layers;
  // Some change is required, or some layer's max drops by >= min_gain; false = no change.
  bool worth_publishing = false;
};

absl::StatusOr<Plan> PlanPlacement(const PlannerInput& input, const PlannerOptions& options);

// A service's load in one layer: sum over the experts it holds of load / replicas.
// `holders[e]` are the services holding expert e; returns [num_services].
std::vector<double> ServiceLoads(const std::vector<std::vector<int>>& holders,
                                 const std::vector<double>& load, int num_services);

}  // namespace moemesh
