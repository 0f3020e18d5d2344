#include "router_service/router_metrics.h"

#include "absl/strings/str_cat.h"
#include "services/base/status_macros.h"

namespace moemesh {

absl::StatusOr<std::unique_ptr<RouterMetrics>> RouterMetrics::Create(
    metrics::Registry& registry, const MoeModelConfig& config, ExpertSeriesSelection selection) {
  auto m = std::unique_ptr<RouterMetrics>(new RouterMetrics(registry, std::move(selection)));
  ASSIGN_OR_RETURN(auto* requests,
                   metrics::AddCounter(registry, "moemesh_router_requests_total",
                                       "ModelInfer calls answered, by gRPC status code."));
  m->requests_ = std::make_unique<metrics::StatusCodeCounters>(*requests);
  ASSIGN_OR_RETURN(auto* inflight, metrics::AddGauge(registry, "moemesh_router_inflight_requests",
                                                     "ModelInfer calls being served."));
  m->inflight_ = &inflight->Add();
  ASSIGN_OR_RETURN(m->shed_,
                   metrics::AddCounter(registry, "moemesh_router_shed_total",
                                       "ModelInfer calls refused by admission control at once: "
                                       "reason=inflight (RESOURCE_EXHAUSTED over "
                                       "--max-inflight-tokens), reason=deadline "
                                       "(DEADLINE_EXCEEDED: queued past what its deadline "
                                       "allows)."));
  for (const char* reason : {"inflight", "deadline"}) m->shed_->Add({{"reason", reason}});
  ASSIGN_OR_RETURN(auto* tokens, metrics::AddCounter(registry, "moemesh_router_tokens_total",
                                                     "Tokens (hidden_states rows) forwarded."));
  m->tokens_ = &tokens->Add();
  ASSIGN_OR_RETURN(auto* expert_tokens,
                   metrics::AddCounter(registry, "moemesh_router_expert_tokens_total",
                                       "Token-to-expert assignments routed to each expert "
                                       "(layer=\"all\": summed over layers)."));
  ASSIGN_OR_RETURN(auto* dropped,
                   metrics::AddCounter(registry, "moemesh_router_dropped_tokens_total",
                                       "Token-to-expert assignments dropped over capacity."));
  for (int64_t layer : config.MoeLayers()) {
    m->dropped_[layer] = &dropped->Add({{"layer", absl::StrCat(layer)}});
    auto& counters = m->expert_tokens_[layer];
    const std::optional<std::string> label = m->selection_.LayerLabel(layer);
    if (!label) continue;
    for (int64_t e = 0; e < config.num_experts; ++e) {
      counters.push_back(&expert_tokens->Add({{"layer", *label}, {"expert", absl::StrCat(e)}}));
    }
  }
  ASSIGN_OR_RETURN(m->dispatch_latency_,
                   metrics::AddHistogram(registry, "moemesh_router_dispatch_latency_seconds",
                                         "One expert-service call, sent to answered, per "
                                         "destination endpoint.",
                                         metrics::LatencyBuckets()));
  ASSIGN_OR_RETURN(m->dispatch_failures_,
                   metrics::AddCounter(registry, "moemesh_router_dispatch_failures_total",
                                       "Failed expert-service calls by destination and code."));
  ASSIGN_OR_RETURN(auto* layer_latency,
                   metrics::AddHistogram(registry, "moemesh_router_layer_latency_seconds",
                                         "One MoE layer call: gate, dispatch, combine.",
                                         metrics::LatencyBuckets()));
  m->layer_latency_ = &layer_latency->Add();
  return m;
}

void RouterMetrics::CountRouted(int64_t layer, int64_t tokens, const std::vector<int64_t>& counts,
                                int64_t dropped) {
  tokens_->Increment(static_cast<double>(tokens));
  const auto it = expert_tokens_.find(layer);
  if (it != expert_tokens_.end() && !it->second.empty()) {
    const auto& counters = it->second;
    for (size_t e = 0; e < counts.size() && e < counters.size(); ++e) {
      if (counts[e] > 0) counters[e]->Increment(static_cast<double>(counts[e]));
    }
  }
  if (dropped > 0) {
    const auto d = dropped_.find(layer);
    if (d != dropped_.end()) d->second->Increment(static_cast<double>(dropped));
  }
}

metrics::Histogram* RouterMetrics::DispatchLatency(const std::string& destination) {
  // The failures an operator alerts on exist from the first call, at 0, so that rate()
  // and increase() see the first one.
  for (absl::StatusCode code :
       {absl::StatusCode::kUnavailable, absl::StatusCode::kDeadlineExceeded}) {
    dispatch_failures_->Add(
        {{"destination", destination}, {"code", absl::StatusCodeToString(code)}});
  }
  return &dispatch_latency_->Add({{"destination", destination}});
}

void RouterMetrics::CountDispatchFailure(const std::string& destination, absl::StatusCode code) {
  dispatch_failures_->Add({{"destination", destination}, {"code", absl::StatusCodeToString(code)}})
      .Increment();
}

}  // namespace moemesh
