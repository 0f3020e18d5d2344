#include "services/mesh/planner.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstddef>
#include <functional>
#include <limits>
#include <numeric>
#include <queue>
#include <set>
#include <tuple>
#include <utility>

#include "absl/strings/str_cat.h"
#include "services/base/status_macros.h"

namespace moemesh {

absl::Status PlannerOptions::Validate() const {
  if (min_replicas < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("min_replicas must be >= 1, got ", min_replicas));
  }
  if (expert_slots < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("expert_slots must be >= 0 (0 = unlimited), got ", expert_slots));
  }
  if (!(min_gain >= 0 && min_gain < 1)) {
    return absl::InvalidArgumentError(absl::StrCat("min_gain must be in [0, 1), got ", min_gain));
  }
  if (max_moves_per_layer < 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "max_moves_per_layer must be >= 0 (0 = unlimited), got ", max_moves_per_layer));
  }
  if (exact_search_nodes < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("exact_search_nodes must be >= 0, got ", exact_search_nodes));
  }
  return absl::OkStatus();
}

std::vector<double> ServiceLoads(const std::vector<std::vector<int>>& holders,
                                 const std::vector<double>& load, int num_services) {
  std::vector<double> out(std::max(num_services, 0), 0.0);
  for (size_t e = 0; e < holders.size() && e < load.size(); ++e) {
    if (holders[e].empty()) continue;
    const double c = load[e] / static_cast<double>(holders[e].size());
    for (int s : holders[e]) {
      if (s >= 0 && s < num_services) out[s] += c;
    }
  }
  return out;
}

namespace {

constexpr int kUnlimited = std::numeric_limits<int>::max();
// Differences below this fraction of a layer's mean load are rounding noise.
constexpr double kRelEps = 1e-9;
// A local-search step must lower the max by at least this fraction of the layer's mean: a
// copy of an expert's weights buys no less.
constexpr double kMinStep = 1e-3;
// Steps whose benefit is within this fraction of the best one count as similar: the one
// that copies fewer weights wins among them.
constexpr double kSimilarBenefit = 0.2;
// The repack's plan replaces the local search's only when its max is lower by more than
// this fraction of the layer's mean.
constexpr double kSimilarPlan = 0.02;
// The repack leaves a replica where it is when that service is at most this fraction of the
// mean above the least loaded one.
constexpr double kAffinitySlack = 0.1;
// Local-search steps tried before the repack: enough for a nearly balanced layer.
constexpr int kProbeSteps = 8;
// Moves and adds that first make room on the receiving service try the few least loaded,
// moving at most kMaxEvict of its experts away.
constexpr int kEvictTargets = 4;
constexpr int kMaxEvict = 8;
// Swaps, and moves or adds that drop a surplus replica first, try this many receivers.
constexpr int kNearTargets = 8;
// Replica targets stop splitting an expert once a replica carries at most this fraction of
// its layer's mean load (with unlimited slots; otherwise the slots run out first).
constexpr double kStopPiece = 0.5;
// The exact search runs on layers with at most this many candidate placements.
constexpr double kExactSpace = 2e6;
constexpr int kExactMaxServices = 6;

absl::Status ValidateInput(const PlannerInput& in) {
  if (in.num_experts <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("num_experts must be > 0, got ", in.num_experts));
  }
  if (in.num_services <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("num_services must be > 0, got ", in.num_services));
  }
  if (static_cast<int64_t>(in.draining.size()) != in.num_services) {
    return absl::InvalidArgumentError(absl::StrCat("draining has ", in.draining.size(),
                                                   " entries, num_services is ", in.num_services));
  }
  if (in.expert_bytes < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("expert_bytes must be >= 0, got ", in.expert_bytes));
  }
  std::set<int64_t> layers;
  for (int64_t l : in.layers) {
    if (!layers.insert(l).second) {
      return absl::InvalidArgumentError(absl::StrCat("layers: layer ", l, " appears twice"));
    }
  }
  for (const auto& [l, unused] : in.current) {
    if (!layers.count(l)) {
      return absl::InvalidArgumentError(absl::StrCat("current: layer ", l, " is not in layers"));
    }
  }
  for (const auto& [l, unused] : in.load) {
    if (!layers.count(l)) {
      return absl::InvalidArgumentError(absl::StrCat("load: layer ", l, " is not in layers"));
    }
  }
  const int S = in.num_services;
  std::vector<char> seen(S);
  for (int64_t l : layers) {
    auto cur = in.current.find(l);
    if (cur == in.current.end()) {
      return absl::InvalidArgumentError(absl::StrCat("current: no entry for layer ", l));
    }
    if (static_cast<int64_t>(cur->second.size()) != in.num_experts) {
      return absl::InvalidArgumentError(absl::StrCat("current[", l, "] has ", cur->second.size(),
                                                     " experts, num_experts is ", in.num_experts));
    }
    for (int e = 0; e < in.num_experts; ++e) {
      std::fill(seen.begin(), seen.end(), 0);
      for (int s : cur->second[e]) {
        if (s < 0 || s >= S) {
          return absl::InvalidArgumentError(
              absl::StrCat("current[", l, "][", e, "]: service ", s, " out of range [0, ", S, ")"));
        }
        if (seen[s]++) {
          return absl::InvalidArgumentError(
              absl::StrCat("current[", l, "][", e, "]: service ", s, " listed twice"));
        }
      }
    }
    auto ld = in.load.find(l);
    if (ld == in.load.end()) {
      return absl::InvalidArgumentError(absl::StrCat("load: no entry for layer ", l));
    }
    if (static_cast<int64_t>(ld->second.size()) != in.num_experts) {
      return absl::InvalidArgumentError(absl::StrCat("load[", l, "] has ", ld->second.size(),
                                                     " entries, num_experts is ", in.num_experts));
    }
    for (int e = 0; e < in.num_experts; ++e) {
      const double v = ld->second[e];
      if (!std::isfinite(v) || v < 0) {
        return absl::InvalidArgumentError(
            absl::StrCat("load[", l, "][", e, "] = ", v, ": must be finite and >= 0"));
      }
    }
  }
  return absl::OkStatus();
}

// One MoE layer's working state. Loads are kept incrementally (every holder of an expert
// changes when its replica count does) and recomputed from scratch for the reports.
struct Layer {
  int64_t id = 0;
  int index = 0;                          // in Planner::layers_
  std::vector<double> w;                  // [E] load
  std::vector<std::vector<int>> orig;     // [E] current holders (the input)
  std::vector<std::vector<int>> holders;  // [E] holders now
  std::vector<std::vector<int>> snap;     // [E] the committed state (required changes)
  std::vector<char> holds, orig_holds;    // [E*S]
  std::vector<double> load;               // [S]
  std::vector<std::vector<int>> held;     // [S] experts each service holds
  std::vector<int> cnt, snap_cnt;         // [S] pairs held now / in the committed state
  std::vector<int> target;                // [E] replica targets of the repack
  // Pairs the layer holds now, and (slots limited) the most the optimisation's adds may
  // reach: its replica targets' sum (or what it holds, if more), so the layers optimised
  // first leave the later ones their share of the free slots.
  int64_t pairs = 0, budget = std::numeric_limits<int64_t>::max();
  double total = 0, mean = 0, eps = 0, min_step = 0;
  double max_before = 0, max_snap = 0;
  int net_adds = 0, snap_net_adds = 0;  // sum over experts of |holders \ orig|
  bool required = false;                // some change is required
};

// A candidate step of the local search, lowering the load of the layer's most loaded
// service m.
struct Action {
  enum Kind { kDrop, kMove, kAdd, kSwap };
  Kind kind = kDrop;
  int e = -1;  // expert leaving m (or gaining a replica)
  int m = -1;  // the most loaded service
  int t = -1;  // the receiving service
  int f = -1;  // kSwap: the expert coming back from t to m
  int g = -1;  // a surplus replica dropped on t to free its slot, or -1
  // kMove / kAdd: experts moved off t first (ev_f[i] to ev_u[i]) to make room for e.
  int evicted = 0;
  std::array<int, kMaxEvict> ev_f{}, ev_u{};
  double benefit = 0;  // m's load minus the highest load among the services the step touches
  int cost = 0;        // change in the number of copies the plan makes

  auto Key() const {  // the tie-break: fewer copies, larger benefit, lowest indices
    return std::make_tuple(cost, -benefit, e, t, f, g, evicted, ev_f, ev_u, static_cast<int>(kind));
  }
};

Action MakeAction(Action::Kind kind, int e, int m, int t, int f, int g, double benefit, int cost) {
  Action a;
  a.kind = kind, a.e = e, a.m = m, a.t = t, a.f = f, a.g = g;
  a.benefit = benefit, a.cost = cost;
  return a;
}

class Planner {
 public:
  Planner(const PlannerInput& in, const PlannerOptions& opt)
      : in_(in),
        opt_(opt),
        S_(in.num_services),
        E_(in.num_experts),
        cap_(opt.expert_slots > 0 ? opt.expert_slots : kUnlimited),
        reserved_(in.num_services, 0),
        acc_(in.num_services, 0.0),
        acc_mark_(in.num_services, 0),
        slot_(in.num_services, 0) {}

  absl::StatusOr<Plan> Run();

 private:
  bool Holds(const Layer& L, int e, int s) const { return L.holds[e * S_ + s] != 0; }
  bool OrigHolds(const Layer& L, int e, int s) const { return L.orig_holds[e * S_ + s] != 0; }
  // Less loaded, or as loaded and holding fewer of the layer's experts (cold experts, and
  // every expert before any load is measured, spread evenly rather than onto service 0).
  static bool Lighter(const Layer& L, int a, int b) {
    return std::tie(L.load[a], L.cnt[a]) < std::tie(L.load[b], L.cnt[b]);
  }
  int Replicas(const Layer& L, int e) const { return static_cast<int>(L.holders[e].size()); }
  double PerReplica(const Layer& L, int e) const { return L.w[e] / Replicas(L, e); }
  bool Surplus(const Layer& L, int e) const { return Replicas(L, e) > need_; }
  int CopyCost(const Layer& L, int e, int s) const { return OrigHolds(L, e, s) ? 0 : 1; }
  int DropCost(const Layer& L, int e, int s) const { return OrigHolds(L, e, s) ? 0 : -1; }

  // Slots: a layer reserves max(now, committed) pairs on each service until it is
  // committed, so reverting it always finds its slots free.
  void SetCount(Layer& L, int s, int n) {
    reserved_[s] += std::max(n, L.snap_cnt[s]) - std::max(L.cnt[s], L.snap_cnt[s]);
    L.pairs += n - L.cnt[s];
    L.cnt[s] = n;
  }
  int SlotsLeft(const Layer& L, int s) const {
    if (cap_ == kUnlimited) return kUnlimited;
    const int64_t others = reserved_[s] - std::max(L.cnt[s], L.snap_cnt[s]);
    return static_cast<int>(std::max<int64_t>(0, cap_ - others - L.cnt[s]));
  }
  bool HasSlot(const Layer& L, int s) const { return SlotsLeft(L, s) > 0; }

  // Donors: when a service is full, a layer may take the slot of another layer's replica
  // there that the other layer's replica targets do not need, if none of that expert's
  // other holders reaches that layer's max by the drop. Other layers are committed while
  // one layer is optimised, so a donor that fails once fails for good (for every layer but
  // its own).
  struct Donor {
    double coldness;  // load per replica / the layer's mean
    int layer, expert;
    bool operator<(const Donor& o) const {
      return std::tie(coldness, layer, expert) < std::tie(o.coldness, o.layer, o.expert);
    }
  };
  void BuildDonors();
  int FindDonor(const Layer& L, int t);  // an index in donors_[t], or -1
  void Donate(int t, int index);
  bool CanTake(const Layer& L, int t) { return HasSlot(L, t) || FindDonor(L, t) >= 0; }
  void PlaceWithSlot(Layer& L, int e, int t) {  // t: CanTake(L, t) just now
    if (!HasSlot(L, t)) Donate(t, FindDonor(L, t));
    Place(L, e, t);
  }

  void Place(Layer& L, int e, int s);
  void Unplace(Layer& L, int e, int s);
  double MaxLoad(const Layer& L, int* argmax) const;
  void SetPlacement(Layer& L, const std::vector<std::vector<int>>& holders);
  void Commit(Layer& L);

  // Required changes.
  absl::Status ApplyRequirements();
  absl::Status MakeRoom(Layer& L, int e);
  absl::Status FixOverfullService(int s);

  // Optimisation.
  void Optimise();
  void ReplicaTargets();
  bool Repack(Layer& L);
  bool ExactSearch(Layer& L);
  int LocalSearch(Layer& L, double good_enough, int copy_cap, int max_steps);
  bool BestAction(Layer& L, Action* best);
  bool PlanEviction(const Layer& L, const Action& base, double p, double m_new, double lm,
                    Action* a);
  void Consider(const Layer& L, const Action& a);
  bool Apply(Layer& L, const Action& a);

  // Accumulated load deltas of one candidate, merged by service.
  void AccAdd(int s, double d) {
    if (!acc_mark_[s]) {
      acc_mark_[s] = 1;
      acc_list_.push_back(s);
      acc_[s] = 0;
    }
    acc_[s] += d;
  }
  double AccMaxAndClear(const Layer& L) {
    double mx = -std::numeric_limits<double>::infinity();
    for (int s : acc_list_) {
      mx = std::max(mx, L.load[s] + acc_[s]);
      acc_mark_[s] = 0;
    }
    acc_list_.clear();
    return mx;
  }
  // Deltas of dropping g's replica on t (the others' share of g's load grows).
  void AccDrop(const Layer& L, int g, int t) {
    const int r = Replicas(L, g);
    const double c = L.w[g] / r, c2 = L.w[g] / (r - 1);
    for (int h : L.holders[g]) AccAdd(h, h == t ? -c : c2 - c);
  }

  const PlannerInput& in_;
  const PlannerOptions& opt_;
  const int S_, E_;
  const int cap_;
  int need_ = 1;
  int active_count_ = 0;
  std::vector<int64_t> reserved_;  // [S] pairs reserved over all layers
  std::vector<Layer> layers_;

  // Scratch.
  std::vector<double> acc_;
  std::vector<char> acc_mark_;
  std::vector<int> acc_list_;
  std::vector<Action> candidates_;
  double best_benefit_ = 0;
  std::vector<int> order_;
  std::vector<std::pair<double, int>> by_load_;
  std::vector<int> evict_pool_;
  std::vector<int> free_order_;             // order_'s services with a free slot
  std::vector<char> slot_;                  // [S] CanTake, for the current step
  std::vector<std::vector<Donor>> donors_;  // [S] coldest first
  std::vector<size_t> donor_pos_;           // [S] donors before it failed for good
  std::vector<int> donor_memo_;             // [S] FindDonor for the layer being optimised
};

void Planner::BuildDonors() {
  donors_.assign(S_, {});
  donor_pos_.assign(S_, 0);
  donor_memo_.assign(S_, -2);
  if (cap_ == kUnlimited) return;
  for (const Layer& L : layers_) {
    for (int g = 0; g < E_; ++g) {
      if (!Surplus(L, g) || Replicas(L, g) <= L.target[g]) continue;
      for (int t : L.holders[g]) {
        donors_[t].push_back({L.mean > 0 ? PerReplica(L, g) / L.mean : 0, L.index, g});
      }
    }
  }
  for (auto& d : donors_) std::sort(d.begin(), d.end());
}

int Planner::FindDonor(const Layer& L, int t) {
  if (cap_ == kUnlimited || in_.draining[t]) return -1;
  if (donor_memo_[t] != -2) return donor_memo_[t];
  const auto& list = donors_[t];
  int found = -1;
  for (size_t i = donor_pos_[t]; i < list.size() && found < 0; ++i) {
    const Donor& d = list[i];
    if (d.layer == L.index) continue;
    const Layer& L2 = layers_[d.layer];
    const int g = d.expert;
    bool ok = Holds(L2, g, t) && Surplus(L2, g) && Replicas(L2, g) > L2.target[g];
    if (ok) {
      const int r = Replicas(L2, g);
      const double delta = L2.w[g] / (r - 1) - L2.w[g] / r;
      for (int h : L2.holders[g]) {
        ok &= h == t || L2.load[h] + delta < L2.max_snap - L2.eps;
      }
    }
    if (ok) {
      found = static_cast<int>(i);
    } else if (i == donor_pos_[t]) {
      ++donor_pos_[t];  // failed for good
    }
  }
  return donor_memo_[t] = found;
}

// Drops the donor's replica; its layer (committed) commits the drop at once.
void Planner::Donate(int t, int index) {
  const Donor& d = donors_[t][index];
  Layer& L2 = layers_[d.layer];
  Unplace(L2, d.expert, t);
  auto& sg = L2.snap[d.expert];
  sg.erase(std::find(sg.begin(), sg.end(), t));
  reserved_[t] += L2.cnt[t] - std::max(L2.cnt[t], L2.snap_cnt[t]);
  L2.snap_cnt[t] = L2.cnt[t];
  L2.snap_net_adds = L2.net_adds;
  // The drop changes the expert's replica count, and so whether its replicas on other
  // services may still donate: every memo is stale.
  std::fill(donor_memo_.begin(), donor_memo_.end(), -2);
}

void Planner::Place(Layer& L, int e, int s) {
  auto& h = L.holders[e];
  const int r = static_cast<int>(h.size());
  const double c_new = L.w[e] / (r + 1);
  if (r > 0) {
    const double d = c_new - L.w[e] / r;
    for (int x : h) L.load[x] += d;
  }
  h.push_back(s);
  L.load[s] += c_new;
  L.holds[e * S_ + s] = 1;
  L.held[s].push_back(e);
  if (!OrigHolds(L, e, s)) ++L.net_adds;
  SetCount(L, s, L.cnt[s] + 1);
}

void Planner::Unplace(Layer& L, int e, int s) {
  auto& h = L.holders[e];
  const int r = static_cast<int>(h.size());
  const double c_old = L.w[e] / r;
  h.erase(std::find(h.begin(), h.end(), s));
  L.load[s] -= c_old;
  if (r > 1) {
    const double d = L.w[e] / (r - 1) - c_old;
    for (int x : h) L.load[x] += d;
  }
  L.holds[e * S_ + s] = 0;
  auto& hs = L.held[s];
  hs.erase(std::find(hs.begin(), hs.end(), e));
  if (!OrigHolds(L, e, s)) --L.net_adds;
  SetCount(L, s, L.cnt[s] - 1);
}

double Planner::MaxLoad(const Layer& L, int* argmax) const {
  int m = 0;
  for (int s = 1; s < S_; ++s) {
    if (L.load[s] > L.load[m]) m = s;
  }
  if (argmax) *argmax = m;
  return L.load[m];
}

void Planner::SetPlacement(Layer& L, const std::vector<std::vector<int>>& holders) {
  for (int e = 0; e < E_; ++e) {
    for (int x : std::vector<int>(L.holders[e])) {
      if (std::find(holders[e].begin(), holders[e].end(), x) == holders[e].end()) Unplace(L, e, x);
    }
    for (int x : holders[e]) {
      if (!Holds(L, e, x)) Place(L, e, x);
    }
    L.holders[e] = holders[e];
  }
  L.load = ServiceLoads(L.holders, L.w, S_);
}

// Makes the layer's state its committed one: what it no longer holds stops being reserved.
void Planner::Commit(Layer& L) {
  L.load = ServiceLoads(L.holders, L.w, S_);
  L.snap = L.holders;
  for (int s = 0; s < S_; ++s) {
    reserved_[s] += L.cnt[s] - std::max(L.cnt[s], L.snap_cnt[s]);
    L.snap_cnt[s] = L.cnt[s];
  }
  L.snap_net_adds = L.net_adds;
  L.max_snap = MaxLoad(L, nullptr);
}

// ---------------------------------------------------------------------------------------
// Required changes.

// Frees a slot on a service that can take a replica of L's expert e: drops the coldest
// surplus replica (any layer) on such a service, or moves another expert from a full
// one to a service with room.
absl::Status Planner::MakeRoom(Layer& L, int e) {
  Layer* best_layer = nullptr;
  int best_g = -1, best_t = -1;
  double best_c = std::numeric_limits<double>::infinity();
  for (int t = 0; t < S_; ++t) {
    if (in_.draining[t] || Holds(L, e, t)) continue;
    for (Layer& L2 : layers_) {
      for (int g : L2.held[t]) {
        if (!Surplus(L2, g)) continue;
        const double c = PerReplica(L2, g);
        if (c < best_c) {
          best_c = c, best_layer = &L2, best_g = g, best_t = t;
        }
      }
    }
  }
  if (best_layer) {
    Unplace(*best_layer, best_g, best_t);
    best_layer->required = true;
    return absl::OkStatus();
  }
  for (int t = 0; t < S_; ++t) {
    if (in_.draining[t] || Holds(L, e, t)) continue;
    for (Layer& L2 : layers_) {
      for (int f : L2.held[t]) {
        for (int u = 0; u < S_; ++u) {
          if (u == t || in_.draining[u] || Holds(L2, f, u) || !HasSlot(L2, u)) continue;
          Place(L2, f, u);
          Unplace(L2, f, t);
          L2.required = true;
          return absl::OkStatus();
        }
      }
    }
  }
  return absl::FailedPreconditionError(
      absl::StrCat("no slot for a replica of layer ", L.id, " expert ", e,
                   ": expert_slots=", opt_.expert_slots, " is too small"));
}

// A service holding more pairs than expert_slots (the option shrank) sheds surplus
// replicas, coldest first, then moves experts to services with room.
absl::Status Planner::FixOverfullService(int s) {
  while (reserved_[s] > cap_) {
    Layer* best_layer = nullptr;
    int best_e = -1;
    double best_c = std::numeric_limits<double>::infinity();
    for (Layer& L : layers_) {
      for (int e : L.held[s]) {
        if (Surplus(L, e) && PerReplica(L, e) < best_c) {
          best_c = PerReplica(L, e), best_layer = &L, best_e = e;
        }
      }
    }
    if (best_layer) {
      Unplace(*best_layer, best_e, s);
      best_layer->required = true;
      continue;
    }
    bool moved = false;
    for (Layer& L : layers_) {
      for (int e : L.held[s]) {
        int target = -1;
        for (int u = 0; u < S_; ++u) {
          if (u == s || in_.draining[u] || Holds(L, e, u) || !HasSlot(L, u)) continue;
          if (target < 0 || L.load[u] < L.load[target]) target = u;
        }
        if (target >= 0) {
          Place(L, e, target);
          Unplace(L, e, s);
          L.required = true;
          moved = true;
          break;
        }
      }
      if (moved) break;
    }
    if (!moved) {
      return absl::FailedPreconditionError(absl::StrCat("service ", s, " holds ", reserved_[s],
                                                        " pairs, more than expert_slots=", cap_,
                                                        ", and none can move"));
    }
  }
  return absl::OkStatus();
}

absl::Status Planner::ApplyRequirements() {
  // Draining services give up everything.
  for (Layer& L : layers_) {
    for (int e = 0; e < E_; ++e) {
      for (int s : std::vector<int>(L.holders[e])) {
        if (in_.draining[s]) {
          Unplace(L, e, s);
          L.required = true;
        }
      }
    }
  }
  for (int s = 0; s < S_; ++s) {
    if (!in_.draining[s]) RETURN_IF_ERROR(FixOverfullService(s));
  }
  // Lost experts and missing replicas: heaviest first, each onto the least loaded service
  // (of its layer) with a free slot.
  std::vector<int> order;
  for (Layer& L : layers_) {
    order.clear();
    for (int e = 0; e < E_; ++e) {
      if (Replicas(L, e) < need_) order.push_back(e);
    }
    std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return L.w[a] > L.w[b]; });
    for (int e : order) {
      L.required = true;
      while (Replicas(L, e) < need_) {
        int target = -1;
        for (int t = 0; t < S_; ++t) {
          if (in_.draining[t] || Holds(L, e, t) || !HasSlot(L, t)) continue;
          if (target < 0 || Lighter(L, t, target)) target = t;
        }
        if (target < 0) {
          RETURN_IF_ERROR(MakeRoom(L, e));
          continue;
        }
        Place(L, e, target);
      }
    }
  }
  return absl::OkStatus();
}

// ---------------------------------------------------------------------------------------
// Replica targets.

// Every expert starts at min_replicas; the slots left go, one at a time, to the (layer,
// expert) whose load per replica is the largest fraction of its layer's mean (EPLB's
// replication rule, across layers), until the slots run out or no replica carries more
// than kStopPiece of its layer's mean.
void Planner::ReplicaTargets() {
  const int64_t slots = cap_ == kUnlimited ? std::numeric_limits<int64_t>::max()
                                           : static_cast<int64_t>(active_count_) * cap_;
  int64_t pieces = 0;
  using Entry = std::tuple<double, int, int>;  // load per replica / mean, -layer, -expert
  std::vector<Entry> heap;
  for (Layer& L : layers_) {
    L.target.assign(E_, need_);
    pieces += static_cast<int64_t>(E_) * need_;
    if (L.mean <= 0) continue;
    for (int e = 0; e < E_; ++e) heap.emplace_back(L.w[e] / need_ / L.mean, -L.index, -e);
  }
  std::make_heap(heap.begin(), heap.end());
  while (pieces < slots && !heap.empty()) {
    std::pop_heap(heap.begin(), heap.end());
    const auto [piece, nl, ne] = heap.back();
    heap.pop_back();
    if (piece <= kStopPiece) break;
    Layer& L = layers_[-nl];
    int& r = L.target[-ne];
    if (r >= active_count_) continue;
    ++r;
    ++pieces;
    heap.emplace_back(L.w[-ne] / r / L.mean, nl, ne);
    std::push_heap(heap.begin(), heap.end());
  }
  if (cap_ == kUnlimited) return;
  for (Layer& L : layers_) {
    L.budget = std::max<int64_t>(L.pairs, std::accumulate(L.target.begin(), L.target.end(), 0));
  }
}

// The repack: the layer's replica targets packed from scratch, heaviest replica first, each
// onto the least loaded service with a free slot (EPLB's packing), except
// that a replica stays on a service that holds it now whenever that service is no more
// than kAffinitySlack of the mean above the least loaded one. False (and nothing changed)
// if some expert gets no replica.
bool Planner::Repack(Layer& L) {
  for (int e = 0; e < E_; ++e) {
    while (!L.holders[e].empty()) Unplace(L, e, L.holders[e].back());
  }
  std::vector<std::pair<double, int>> pieces;
  for (int e = 0; e < E_; ++e) {
    for (int k = 0; k < L.target[e]; ++k) pieces.emplace_back(-L.w[e] / L.target[e], e);
  }
  std::sort(pieces.begin(), pieces.end());
  const double slack = std::min(kAffinitySlack, opt_.min_gain) * L.mean;
  auto room = [&](int s) { return !in_.draining[s] && CanTake(L, s); };
  for (const auto& [neg, e] : pieces) {
    int best = -1, stay = -1;
    for (int s = 0; s < S_; ++s) {
      if (Holds(L, e, s)) continue;
      const bool cheaper = best < 0 || Lighter(L, s, best);
      const bool here = OrigHolds(L, e, s) && (stay < 0 || Lighter(L, s, stay));
      if (!cheaper && !here) continue;
      if (!room(s)) continue;
      if (cheaper) best = s;
      if (here) stay = s;
    }
    if (stay >= 0 && L.load[stay] <= L.load[best] + slack) best = stay;
    if (best < 0) {
      if (Replicas(L, e) >= need_) continue;  // one replica fewer than its target
      SetPlacement(L, L.snap);
      return false;
    }
    PlaceWithSlot(L, e, best);
  }
  return true;
}

// ---------------------------------------------------------------------------------------
// Exact search for small layers.

// Every holder set of every expert (subsets of the non-draining services with at least
// min_replicas members, within the layer's slots), experts heaviest first, the cheapest
// sets first; keeps the lowest (max load, copies). Replaces the layer's placement when it
// finds a better one. False when the space is too large or the node budget runs out.
bool Planner::ExactSearch(Layer& L) {
  if (opt_.exact_search_nodes <= 0) return false;
  std::vector<int> act;
  for (int s = 0; s < S_; ++s) {
    if (!in_.draining[s]) act.push_back(s);
  }
  const int a = static_cast<int>(act.size());
  if (a > kExactMaxServices) return false;
  std::vector<int> masks;
  for (int mk = 1; mk < (1 << a); ++mk) {
    if (__builtin_popcount(mk) >= need_) masks.push_back(mk);
  }
  if (E_ * std::log(static_cast<double>(masks.size())) > std::log(kExactSpace)) return false;

  struct Search {
    Search(const Layer& layer, int services) : L(layer), a(services) {}
    const Layer& L;
    int a;
    std::vector<int> limit, order;
    std::vector<std::vector<std::pair<int, int>>> options;  // per expert: (copies, mask)
    std::vector<double> load;
    std::vector<int> count, assign, best_assign;
    double lb_mean = 0, best_max = 0;
    int best_copies = 0, max_copies = 0;
    int64_t nodes = 0, budget = 0;
    bool found = false, aborted = false;

    void Run(size_t i, double cur_max, int copies) {
      if (aborted) return;
      if (++nodes > budget) {
        aborted = true;
        return;
      }
      const double lb = std::max(cur_max, lb_mean);
      if (lb > best_max + L.eps || (lb >= best_max - L.eps && copies >= best_copies)) return;
      if (i == order.size()) {
        best_max = cur_max, best_copies = copies, best_assign = assign, found = true;
        return;
      }
      const int e = order[i];
      for (const auto& [c, mk] : options[e]) {
        if (copies + c > max_copies) continue;
        bool fits = true;
        for (int j = 0; j < a && fits; ++j) fits = !(mk >> j & 1) || count[j] < limit[j];
        if (!fits) continue;
        const double piece = L.w[e] / __builtin_popcount(mk);
        double mx = cur_max;
        for (int j = 0; j < a; ++j) {
          if (mk >> j & 1) load[j] += piece, ++count[j], mx = std::max(mx, load[j]);
        }
        assign[e] = mk;
        Run(i + 1, mx, copies + c);
        for (int j = 0; j < a; ++j) {
          if (mk >> j & 1) load[j] -= piece, --count[j];
        }
      }
    }
  };
  Search x(L, a);
  x.limit.resize(a);
  for (int j = 0; j < a; ++j) {
    const int left = SlotsLeft(L, act[j]);
    x.limit[j] = left == kUnlimited ? E_ : L.cnt[act[j]] + left;
  }
  x.order.resize(E_);
  std::iota(x.order.begin(), x.order.end(), 0);
  std::stable_sort(x.order.begin(), x.order.end(), [&](int p, int q) { return L.w[p] > L.w[q]; });
  x.options.resize(E_);
  for (int e = 0; e < E_; ++e) {
    int orig = 0;
    for (int j = 0; j < a; ++j) orig |= OrigHolds(L, e, act[j]) ? 1 << j : 0;
    for (int mk : masks) x.options[e].emplace_back(__builtin_popcount(mk & ~orig), mk);
    std::sort(x.options[e].begin(), x.options[e].end());
  }
  x.load.assign(a, 0);
  x.count.assign(a, 0);
  x.assign.assign(E_, 0);
  x.lb_mean = L.total / a;
  x.best_max = MaxLoad(L, nullptr);
  x.best_copies = L.net_adds;
  x.max_copies = opt_.max_moves_per_layer > 0 ? L.snap_net_adds + opt_.max_moves_per_layer
                                              : std::numeric_limits<int>::max();
  x.budget = opt_.exact_search_nodes;
  x.Run(0, 0, 0);
  if (x.aborted || !x.found) return false;
  std::vector<std::vector<int>> holders(E_);
  for (int e = 0; e < E_; ++e) {
    for (int j = 0; j < a; ++j) {
      if (x.best_assign[e] >> j & 1) holders[e].push_back(act[j]);
    }
  }
  SetPlacement(L, holders);
  return true;
}

// ---------------------------------------------------------------------------------------
// Local search.

// Steps until none improves, the max is at most `good_enough`, the plan's copies exceed
// `copy_cap` or `max_steps` steps were taken.
int Planner::LocalSearch(Layer& L, double good_enough, int copy_cap, int max_steps) {
  Action a;
  int steps = 0;
  while (steps < max_steps && L.net_adds <= copy_cap && MaxLoad(L, nullptr) > good_enough &&
         BestAction(L, &a)) {
    if (!Apply(L, a)) break;
    ++steps;
  }
  return steps;
}

void Planner::Consider(const Layer& L, const Action& a) {
  if (a.benefit <= L.min_step) return;
  if (opt_.max_moves_per_layer > 0 &&
      L.net_adds + a.cost - L.snap_net_adds > opt_.max_moves_per_layer) {
    return;
  }
  if (a.kind == Action::kAdd && a.g < 0 && L.pairs >= L.budget) return;
  if (a.benefit < best_benefit_ * (1 - kSimilarBenefit)) return;
  best_benefit_ = std::max(best_benefit_, a.benefit);
  candidates_.push_back(a);
}

// Makes room on t for a replica of load p (m's load becoming m_new) by moving some of t's
// other experts to the least loaded services that stay below m's load lm: the smallest
// expert that makes t fit if there is one, else the largest, at most kMaxEvict. Fills
// a->ev_*, a->benefit and the evictions' part of a->cost; false if nothing can move.
bool Planner::PlanEviction(const Layer& L, const Action& base, double p, double m_new, double lm,
                           Action* a) {
  const int t = base.t;
  *a = base;
  a->evicted = 0;
  double t_new = L.load[t] + p;
  double mx = m_new;
  bool need_slot = !slot_[t];
  evict_pool_.clear();
  for (int f : L.held[t]) {
    if (f != base.e) evict_pool_.push_back(f);
  }
  while (a->evicted < kMaxEvict && (t_new > m_new || need_slot) && !evict_pool_.empty()) {
    const double over = t_new - m_new;
    int pick = 0;
    for (int i = 1; i < static_cast<int>(evict_pool_.size()); ++i) {
      const double c = PerReplica(L, evict_pool_[i]), cp = PerReplica(L, evict_pool_[pick]);
      const bool fits = c >= over, pick_fits = cp >= over;
      if ((fits && (!pick_fits || c < cp)) || (!fits && !pick_fits && c > cp)) pick = i;
    }
    const int f = evict_pool_[pick];
    evict_pool_.erase(evict_pool_.begin() + pick);
    const double c = PerReplica(L, f);
    if (c <= L.eps) continue;
    int u = -1;
    for (int cand : free_order_) {
      if (cand == t || Holds(L, f, cand)) continue;
      bool taken = false;
      for (int i = 0; i < a->evicted; ++i) taken |= a->ev_u[i] == cand;
      if (taken) continue;
      if (L.load[cand] + c < lm - L.eps) u = cand;
      break;  // order_ is by load: the first eligible service is the best one
    }
    if (u < 0) continue;
    a->ev_f[a->evicted] = f;
    a->ev_u[a->evicted] = u;
    ++a->evicted;
    a->cost += CopyCost(L, f, u) + DropCost(L, f, t);
    mx = std::max(mx, L.load[u] + c);
    t_new -= c;
    need_slot = false;
  }
  if (a->evicted == 0 || need_slot) return false;
  a->benefit = lm - std::max(mx, t_new);
  return true;
}

// The best step lowering the layer's most loaded service m, if any: every service it
// touches ends strictly below m's load (so the sorted load vector decreases and the search
// terminates), the largest such drop, and among steps within kSimilarBenefit of it the
// cheapest in copies, then the lowest indices. Steps: drop a surplus replica held by m;
// move one of m's experts to another service, or add a replica of it there (making room
// by dropping a surplus replica there, or by moving a few experts off it); swap one of m's
// experts with a lighter one.
bool Planner::BestAction(Layer& L, Action* best) {
  int m = 0;
  const double lm = MaxLoad(L, &m);
  if (lm <= L.min_step) return false;
  candidates_.clear();
  best_benefit_ = 0;

  for (int e : L.held[m]) {
    const int r = Replicas(L, e);
    if (r <= need_) continue;
    const double c = L.w[e] / r, c2 = L.w[e] / (r - 1);
    double mx = lm - c;
    for (int h : L.holders[e]) {
      if (h != m) mx = std::max(mx, L.load[h] + c2 - c);
    }
    Consider(L, MakeAction(Action::kDrop, e, m, -1, -1, -1, lm - mx, DropCost(L, e, m)));
  }

  by_load_.clear();
  for (int t = 0; t < S_; ++t) {
    if (t != m && !in_.draining[t]) by_load_.emplace_back(L.load[t], t);
  }
  std::sort(by_load_.begin(), by_load_.end());
  order_.clear();
  free_order_.clear();
  for (const auto& [unused, t] : by_load_) {
    order_.push_back(t);
    slot_[t] = CanTake(L, t);
    if (slot_[t]) free_order_.push_back(t);
  }

  // Plain moves and adds: a move's benefit min(c, lm - x - c) and an add's
  // min(c - c1, lm - x - c1) only shrink as the receiver's load x grows, so each expert of
  // m needs only the least loaded service that can take it.
  for (int e : L.held[m]) {
    const int r = Replicas(L, e);
    const double c = L.w[e] / r, c1 = L.w[e] / (r + 1);  // c1: per replica after an add
    if (c <= L.eps) continue;
    for (int t : free_order_) {
      if (Holds(L, e, t)) continue;
      const double lt = L.load[t];
      const int copy = CopyCost(L, e, t);
      Consider(L, MakeAction(Action::kMove, e, m, t, -1, -1, lm - std::max(lm - c, lt + c),
                             copy + DropCost(L, e, m)));
      // Every holder of e (m the most loaded) sheds c - c1.
      Consider(
          L, MakeAction(Action::kAdd, e, m, t, -1, -1, lm - std::max(lm - c + c1, lt + c1), copy));
      break;
    }
  }

  // Among the least loaded services: swaps (slots unchanged; benefit at most
  // (lm - x) / 2), and, on a service without a free slot, a move or an add that first
  // drops a surplus replica there.
  const int near = std::min<int>(kNearTargets, static_cast<int>(order_.size()));
  for (int i = 0; i < near; ++i) {
    const int t = order_[i];
    const double lt = L.load[t];
    const bool slot = slot_[t];
    // Without a free slot: the surplus replica on t whose drop raises its other holders the
    // least (the same for every expert of m).
    int g = -1;
    if (!slot) {
      double harm = std::numeric_limits<double>::infinity();
      for (int x : L.held[t]) {
        if (!Surplus(L, x)) continue;
        const int r = Replicas(L, x);
        const double delta = L.w[x] / (r - 1) - L.w[x] / r;
        double h = 0;
        for (int y : L.holders[x]) {
          if (y != t) h = std::max(h, L.load[y] + delta);
        }
        if (h < harm) harm = h, g = x;
      }
    }
    for (int e : L.held[m]) {
      if (Holds(L, e, t)) continue;
      const int r = Replicas(L, e);
      const double c = L.w[e] / r, c1 = L.w[e] / (r + 1);
      if (c <= L.eps) continue;
      const int copy = CopyCost(L, e, t), leave = DropCost(L, e, m);
      if (g >= 0 && g != e) {
        {
          const int gcost = DropCost(L, g, t);
          AccDrop(L, g, t);
          AccAdd(m, -c);
          AccAdd(t, c);
          Consider(L, MakeAction(Action::kMove, e, m, t, -1, g, lm - AccMaxAndClear(L),
                                 copy + leave + gcost));
          AccDrop(L, g, t);
          for (int h : L.holders[e]) AccAdd(h, c1 - c);
          AccAdd(t, c1);
          Consider(L,
                   MakeAction(Action::kAdd, e, m, t, -1, g, lm - AccMaxAndClear(L), copy + gcost));
        }
      }
      if ((lm - lt) / 2 < best_benefit_ * (1 - kSimilarBenefit)) continue;
      for (int f : L.held[t]) {
        if (Holds(L, f, m)) continue;
        const double d = c - PerReplica(L, f);
        if (d <= L.eps) continue;
        Consider(L, MakeAction(Action::kSwap, e, m, t, f, -1, lm - std::max(lm - d, lt + d),
                               copy + leave + CopyCost(L, f, m) + DropCost(L, f, t)));
      }
    }
  }

  // Moves and adds onto the few least loaded services after moving some of their experts
  // away: how a hot expert gains a replica once every service carries some load.
  Action ev;
  int big[2] = {-1, -1};  // m's two largest replicas
  for (int e : L.held[m]) {
    const double c = PerReplica(L, e);
    if (big[0] < 0 || c > PerReplica(L, big[0])) {
      big[1] = big[0], big[0] = e;
    } else if (big[1] < 0 || c > PerReplica(L, big[1])) {
      big[1] = e;
    }
  }
  const int evict_targets = std::min<int>(kEvictTargets, static_cast<int>(order_.size()));
  for (int i = 0; i < evict_targets; ++i) {
    const int t = order_[i];
    for (int e : big) {
      if (e < 0 || Holds(L, e, t)) continue;
      const int r = Replicas(L, e);
      const double c = L.w[e] / r, c1 = L.w[e] / (r + 1);
      if (c <= L.eps) continue;
      const int copy = CopyCost(L, e, t), leave = DropCost(L, e, m);
      const double floor = best_benefit_ * (1 - kSimilarBenefit);
      if (c > floor && (L.load[t] + c > lm - c || !slot_[t]) &&
          PlanEviction(L, MakeAction(Action::kMove, e, m, t, -1, -1, 0, copy + leave), c, lm - c,
                       lm, &ev)) {
        Consider(L, ev);
      }
      if (c - c1 > floor && (L.load[t] + c1 > lm - c + c1 || !slot_[t]) &&
          PlanEviction(L, MakeAction(Action::kAdd, e, m, t, -1, -1, 0, copy), c1, lm - c + c1, lm,
                       &ev)) {
        Consider(L, ev);
      }
    }
  }

  if (candidates_.empty()) return false;
  const double floor = best_benefit_ * (1 - kSimilarBenefit);
  const Action* pick = nullptr;
  for (const Action& a : candidates_) {
    if (a.benefit < floor) continue;
    if (!pick || a.Key() < pick->Key()) pick = &a;
  }
  *best = *pick;
  return true;
}

// False when a slot the step counted on is gone (a donation for an earlier part of the
// step used up the donor another part needed): the layer is put back as it was and the
// search stops (donations already made stay: each dropped a replica its layer's targets
// do not need).
bool Planner::Apply(Layer& L, const Action& a) {
  // The step's placements and removals so far (expert, service, placed), to undo it.
  std::array<std::tuple<int, int, bool>, 2 * kMaxEvict + 4> log;
  int logged = 0;
  auto place = [&](int e, int t) {
    if (!HasSlot(L, t)) {
      const int donor = FindDonor(L, t);
      if (donor < 0) return false;
      Donate(t, donor);
    }
    Place(L, e, t);
    log[logged++] = {e, t, true};
    return true;
  };
  auto unplace = [&](int e, int t) {
    Unplace(L, e, t);
    log[logged++] = {e, t, false};
  };
  auto undo = [&] {
    while (logged > 0) {
      const auto [e, t, placed] = log[--logged];
      if (placed) {
        Unplace(L, e, t);
      } else {
        Place(L, e, t);
      }
    }
  };
  bool ok = true;
  for (int i = 0; ok && i < a.evicted; ++i) {
    ok = place(a.ev_f[i], a.ev_u[i]);
    if (ok) unplace(a.ev_f[i], a.t);
  }
  if (!ok) {
    undo();
    return false;
  }
  switch (a.kind) {
    case Action::kDrop:
      Unplace(L, a.e, a.m);
      break;
    case Action::kMove:
      if (a.g >= 0) unplace(a.g, a.t);
      ok = place(a.e, a.t);
      if (ok) Unplace(L, a.e, a.m);
      break;
    case Action::kAdd:
      if (a.g >= 0) unplace(a.g, a.t);
      ok = place(a.e, a.t);
      break;
    case Action::kSwap:
      Unplace(L, a.e, a.m);
      Unplace(L, a.f, a.t);
      Place(L, a.e, a.t);
      Place(L, a.f, a.m);
      break;
  }
  if (!ok) undo();
  return ok;
}

// ---------------------------------------------------------------------------------------
// The optimisation, one layer at a time, the most imbalanced first (they get free slots
// first): candidate A is the local search from the committed placement (few copies),
// candidate B the sticky repack towards the replica targets, polished by the same local
// search; A wins unless B's max is lower by more than kSimilarPlan of the mean. Small
// layers are then solved exactly. The hysteresis keeps or reverts the layer, and the
// decision is committed before the next layer starts.
void Planner::Optimise() {
  ReplicaTargets();
  std::vector<int> order(layers_.size());
  std::iota(order.begin(), order.end(), 0);
  auto imbalance = [&](int i) {
    return layers_[i].mean > 0 ? layers_[i].max_snap / layers_[i].mean : 0.0;
  };
  std::stable_sort(order.begin(), order.end(),
                   [&](int a, int b) { return imbalance(a) > imbalance(b); });
  std::vector<std::vector<int>> cand_a, cand_b;
  BuildDonors();
  for (int i : order) {
    Layer& L = layers_[i];
    if (L.mean <= 0) continue;
    std::fill(donor_memo_.begin(), donor_memo_.end(), -2);
    // No placement beats max(mean, heaviest expert / services): skip the layer when that
    // bound is not min_gain below its max (a balanced layer costs nothing).
    double bound = L.mean;
    for (int e = 0; e < E_; ++e) bound = std::max(bound, L.w[e] / active_count_);
    const double start = L.max_snap;
    if (start * (1 - opt_.min_gain) < bound - L.eps) continue;
    // A, first a few steps: enough for a layer that is nearly balanced.
    const double similar_plan = std::min(kSimilarPlan, opt_.min_gain / 5) * L.mean;
    const double near_bound = bound + similar_plan;
    const int max_steps = 4 * (E_ + S_);  // a safety net: every step strictly improves
    const int kNoCap = std::numeric_limits<int>::max();
    LocalSearch(L, near_bound, kNoCap, kProbeSteps);
    if (MaxLoad(L, nullptr) > near_bound) {
      // B, then A resumed until it is within kSimilarPlan of B's max (A wins) or has
      // copied as much as B (B wins).
      cand_a = L.holders;
      SetPlacement(L, L.snap);
      if (Repack(L)) LocalSearch(L, 0, kNoCap, max_steps);
      const double max_b = MaxLoad(L, nullptr);
      const int copies_b = L.net_adds;
      cand_b = L.holders;
      SetPlacement(L, cand_a);
      const double similar = max_b + similar_plan;
      LocalSearch(L, similar, copies_b, max_steps);
      if (MaxLoad(L, nullptr) > similar || L.net_adds > copies_b) SetPlacement(L, cand_b);
    }
    ExactSearch(L);
    const double after = MaxLoad(L, nullptr);
    const double gain = start > 0 ? (start - after) / start : 0;
    if (after >= start - L.eps || gain + 1e-12 < opt_.min_gain) SetPlacement(L, L.snap);
    Commit(L);
  }
}

absl::StatusOr<Plan> Planner::Run() {
  for (int s = 0; s < S_; ++s) active_count_ += in_.draining[s] ? 0 : 1;
  if (active_count_ == 0) {
    return absl::FailedPreconditionError("every service is draining: nowhere to place experts");
  }
  need_ = std::min(opt_.min_replicas, active_count_);
  const int64_t pairs = static_cast<int64_t>(in_.layers.size()) * E_ * need_;
  if (opt_.expert_slots > 0 && pairs > static_cast<int64_t>(active_count_) * opt_.expert_slots) {
    return absl::FailedPreconditionError(absl::StrCat(
        "expert_slots=", opt_.expert_slots, " is too small: ", in_.layers.size(), " layers x ", E_,
        " experts x ", need_, " replicas need ", pairs, " slots, ", active_count_,
        " services hold ", static_cast<int64_t>(active_count_) * opt_.expert_slots));
  }

  std::vector<int64_t> ids = in_.layers;
  std::sort(ids.begin(), ids.end());
  layers_.resize(ids.size());
  for (size_t i = 0; i < ids.size(); ++i) {
    Layer& L = layers_[i];
    L.id = ids[i];
    L.index = static_cast<int>(i);
    L.w = in_.load.at(L.id);
    L.orig = in_.current.at(L.id);
    L.holders.assign(E_, {});
    L.holds.assign(static_cast<size_t>(E_) * S_, 0);
    L.orig_holds.assign(static_cast<size_t>(E_) * S_, 0);
    L.load.assign(S_, 0);
    L.held.assign(S_, {});
    L.cnt.assign(S_, 0);
    L.snap_cnt.assign(S_, 0);
    for (int e = 0; e < E_; ++e) {
      L.total += L.w[e];
      for (int s : L.orig[e]) L.orig_holds[e * S_ + s] = 1;
      for (int s : L.orig[e]) Place(L, e, s);
    }
    L.load = ServiceLoads(L.holders, L.w, S_);
    L.max_before = MaxLoad(L, nullptr);
    L.mean = L.total / active_count_;
    L.eps = kRelEps * L.mean;
    L.min_step = std::max(L.eps, kMinStep * L.mean);
  }

  RETURN_IF_ERROR(ApplyRequirements());
  for (Layer& L : layers_) Commit(L);

  Optimise();

  Plan plan;
  std::vector<Change> removes;
  for (Layer& L : layers_) {
    auto& out = plan.placement[L.id];
    out.resize(E_);
    bool changed = false;
    for (int e = 0; e < E_; ++e) {
      const size_t first_remove = removes.size();
      for (int s : L.orig[e]) {
        if (Holds(L, e, s)) {
          out[e].push_back(s);
        } else {
          removes.push_back({L.id, e, s, Change::kRemove});
        }
      }
      std::sort(removes.begin() + first_remove, removes.end(),
                [](const Change& a, const Change& b) { return a.service < b.service; });
      const size_t kept = out[e].size();
      for (int s : L.holders[e]) {
        if (!OrigHolds(L, e, s)) out[e].push_back(s);
      }
      std::sort(out[e].begin() + kept, out[e].end());
      for (size_t k = kept; k < out[e].size(); ++k) {
        plan.changes.push_back({L.id, e, out[e][k], Change::kAdd});
      }
      changed |= out[e].size() != kept || removes.size() != first_remove;
    }
    LayerPlan& lp = plan.layers[L.id];
    lp.max_before = L.max_before;
    const std::vector<double> loads = ServiceLoads(out, L.w, S_);
    lp.max_after = *std::max_element(loads.begin(), loads.end());
    lp.mean = L.mean;
    lp.required = L.required;
    lp.published = changed;
  }
  plan.bytes_moved = static_cast<int64_t>(plan.changes.size()) * in_.expert_bytes;
  plan.changes.insert(plan.changes.end(), removes.begin(), removes.end());
  plan.worth_publishing = !plan.changes.empty();
  return plan;
}

}  // namespace

absl::StatusOr<Plan> PlanPlacement(const PlannerInput& input, const PlannerOptions& options) {
  RETURN_IF_ERROR(options.Validate());
  RETURN_IF_ERROR(ValidateInput(input));
  Planner planner(input, options);
  return planner.Run();
}

}  // namespace moemesh
