// Per-expert load statistics: a sliding time window of routed load per MoE layer (the
// input of the imbalance gauges and of rebalancing), and the choice of which per-expert
// metric series to export (--expert-metrics), which bounds their cardinality.
#pragma once

#include <chrono>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "services/base/mutex.h"
#include "services/model/model_config.h"

namespace moemesh {

// Routed load of one MoE layer over the last `window`: a ring of equal time slices, the
// oldest cleared when its turn comes round again, so the window slides in steps of
// window / slices. Thread-safe; Add takes one short lock per layer call.
class ExpertLoadWindow {
 public:
  using Clock = std::chrono::steady_clock;

  ExpertLoadWindow(int num_experts, std::chrono::milliseconds window, int slices = 12,
                   Clock::time_point start = Clock::now());

  // One layer call: `tokens` input rows, `counts` [E] token→expert assignments per
  // expert, `prob_sums` [E] the router probabilities of the call's tokens summed per
  // expert (nullptr when not measured).
  void Add(int64_t tokens, const int64_t* counts, const double* prob_sums,
           Clock::time_point now = Clock::now());

  struct Stats {
    double seconds = 0;                    // time the window covers (less just after start)
    int64_t tokens = 0;                    // input rows in the window
    std::vector<int64_t> counts;           // [E] assignments per expert
    std::vector<double> rate;              // [E] assignments per second
    std::vector<double> mean_probability;  // [E] P_i: mean router probability (sums to 1)
    double imbalance = 0;                  // max/mean of counts; 0 when there are none
    double balance_statistic = 0;          // E·Σ f_i·P_i, f_i = counts_i/Σcounts; 0 when empty
  };
  Stats Snapshot(Clock::time_point now = Clock::now()) const;

  int num_experts() const { return num_experts_; }
  std::chrono::milliseconds window() const { return window_; }

 private:
  struct Slice {
    int64_t id = -1;  // slice number since start_; -1 never used
    int64_t tokens = 0, prob_tokens = 0;
    std::vector<int64_t> counts;
    std::vector<double> prob_sums;
  };
  int64_t SliceId(Clock::time_point now) const;

  const int num_experts_;
  const std::chrono::milliseconds window_;
  const Clock::duration slice_;
  const Clock::time_point start_;
  mutable Mutex mu_;
  std::vector<Slice> slices_ ABSL_GUARDED_BY(mu_);
};

// Which per-expert series (layer, expert) the metrics export: --expert-metrics.
//   "auto"      every layer when 2 × MoE layers × experts ≤ max_series, else "sum"
//   "all"       every MoE layer
//   "sum"       summed over layers: one series per expert, label layer="all"
//   "L,L,..."   only those MoE layers
class ExpertSeriesSelection {
 public:
  static constexpr int64_t kDefaultMaxSeries = 4000;
  // INVALID_ARGUMENT naming a bad word or a layer that is not an MoE layer.
  static absl::StatusOr<ExpertSeriesSelection> Parse(absl::string_view spec,
                                                     const MoeModelConfig& config,
                                                     int64_t max_series = kDefaultMaxSeries);

  // The `layer` label of `layer`'s per-expert series: its index, "all" when summed, or
  // nullopt when the layer is not exported.
  std::optional<std::string> LayerLabel(int64_t layer) const;
  bool summed() const { return summed_; }
  // MoE layers exported one by one (empty when summed).
  const std::vector<int64_t>& layers() const { return layers_; }

 private:
  bool summed_ = false;
  std::vector<int64_t> layers_;
};

}  // namespace moemesh
