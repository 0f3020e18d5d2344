// The router's Prometheus metrics (docs/metrics.md): requests, tokens, per-expert routed
// load, dispatch latency per destination, layer latency. The gauges computed from the
// router's state at scrape time (imbalance, balance statistic, placement) are registered
// by MoeRouter itself. Updates are lock-free, except a destination's first call.
#pragma once

#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "services/mesh/load_stats.h"
#include "services/metrics/metrics.h"
#include "services/model/model_config.h"

namespace moemesh {

class RouterMetrics {
 public:
  static absl::StatusOr<std::unique_ptr<RouterMetrics>> Create(metrics::Registry& registry,
                                                               const MoeModelConfig& config,
                                                               ExpertSeriesSelection selection);

  metrics::Registry& registry() { return registry_; }
  const ExpertSeriesSelection& selection() const { return selection_; }

  // One ModelInfer call answered with `code`.
  void CountRequest(absl::StatusCode code) { requests_->Increment(code); }
  metrics::Gauge& inflight() { return *inflight_; }
  // One layer call's routing: `tokens` input rows, counts[e] rows routed to expert e,
  // `dropped` assignments over capacity.
  void CountRouted(int64_t layer, int64_t tokens, const std::vector<int64_t>& counts,
                   int64_t dropped);
  // The latency histogram of `destination`, created with its UNAVAILABLE and
  // DEADLINE_EXCEEDED failure counters on first use; cache it.
  metrics::Histogram* DispatchLatency(const std::string& destination);
  void CountDispatchFailure(const std::string& destination, absl::StatusCode code);
  void ObserveLayer(double seconds) { layer_latency_->Observe(seconds); }
  // One ModelInfer call shed by admission control: "inflight" (over --max-inflight-tokens)
  // or "deadline" (queued past what its deadline allows).
  void CountShed(const char* reason) { shed_->Add({{"reason", reason}}).Increment(); }

 private:
  RouterMetrics(metrics::Registry& registry, ExpertSeriesSelection selection)
      : registry_(registry), selection_(std::move(selection)) {}

  metrics::Registry& registry_;
  const ExpertSeriesSelection selection_;
  std::unique_ptr<metrics::StatusCodeCounters> requests_;
  metrics::Gauge* inflight_ = nullptr;
  metrics::Counter* tokens_ = nullptr;
  // Per MoE layer: per expert counters (shared by every layer when summed; empty when
  // the layer is not exported) and the dropped counter.
  std::map<int64_t, std::vector<metrics::Counter*>> expert_tokens_;
  std::map<int64_t, metrics::Counter*> dropped_;
  metrics::Family<metrics::Histogram>* dispatch_latency_ = nullptr;
  metrics::Family<metrics::Counter>* dispatch_failures_ = nullptr;
  metrics::Histogram* layer_latency_ = nullptr;
  metrics::Family<metrics::Counter>* shed_ = nullptr;
};

}  // namespace moemesh
