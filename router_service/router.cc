#include "router_service/router.h"

#include <algorithm>
#include <cstdio>
#include <deque>
#include <fstream>
#include <set>
#include <sstream>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "services/base/scratch.h"
#include "services/base/status_macros.h"
#include "services/rpc/wire.h"

namespace moemesh {

absl::Status ResilienceOptions::Validate() const {
  if (eject_after < 0) return absl::InvalidArgumentError("eject_after must be >= 0");
  if (eject_base.count() <= 0 || eject_max < eject_base) {
    return absl::InvalidArgumentError("eject_base must be positive and at most eject_max");
  }
  if (!(eject_max_share >= 0 && eject_max_share <= 1)) {
    return absl::InvalidArgumentError("eject_max_share must be in [0, 1]");
  }
  if (hedge_after.count() < 0) return absl::InvalidArgumentError("hedge_after must be >= 0");
  if (!(hedge_budget >= 0 && hedge_budget <= 1)) {
    return absl::InvalidArgumentError("hedge_budget must be in [0, 1]");
  }
  return absl::OkStatus();
}

absl::Status RouterOptions::Validate() const {
  if (model_dir.empty()) return absl::InvalidArgumentError("model_dir is required");
  if (placement_file.empty() && endpoints.empty() && !placement_from_controller) {
    return absl::InvalidArgumentError("endpoints, placement_file or a controller is required");
  }
  if (wire_dtype != DType::kF32 && wire_dtype != DType::kBF16) {
    return absl::InvalidArgumentError("wire_dtype must be F32 or BF16");
  }
  if (default_timeout.count() <= 0)
    return absl::InvalidArgumentError("default_timeout must be positive");
  if (load_window.count() <= 0) return absl::InvalidArgumentError("load_window must be positive");
  RETURN_IF_ERROR(resilience.Validate());
  return gate.Validate();
}

absl::StatusOr<std::unique_ptr<MoeRouter>> MoeRouter::Create(
    RouterOptions options, std::shared_ptr<ExpertTransport> transport,
    std::shared_ptr<RouterMetrics> metrics) {
  RETURN_IF_ERROR(options.Validate());
  ASSIGN_OR_RETURN(auto ckpt, Checkpoint::Open(options.model_dir));
  ASSIGN_OR_RETURN(MoeModelConfig config, ParseMoeModelConfig(ckpt->config()));
  PlacementTable table;
  if (options.placement_from_controller) {
    // Epoch 0, no entries: the controller's first table replaces it.
  } else if (!options.placement_file.empty()) {
    std::ifstream in(options.placement_file);
    std::stringstream ss;
    ss << in.rdbuf();
    auto json = nlohmann::json::parse(ss.str(), nullptr, /*allow_exceptions=*/false);
    if (!in || json.is_discarded()) {
      return absl::InvalidArgumentError(absl::StrCat(options.placement_file, ": not valid JSON"));
    }
    ASSIGN_OR_RETURN(table, PlacementTable::FromJson(json, config));
  } else {
    ASSIGN_OR_RETURN(
        table, PlacementTable::Build(config, options.policy, options.endpoints, options.replicas));
  }
  auto router = std::unique_ptr<MoeRouter>(
      new MoeRouter(std::move(options), config, std::move(transport), std::move(metrics)));
  router->ckpt_ = std::move(ckpt);
  for (int64_t layer : config.MoeLayers()) {
    ASSIGN_OR_RETURN(router->gates_[layer],
                     MoeGate::Create(*router->ckpt_, config, layer, router->options_.gate));
    router->load_[layer] = std::vector<std::atomic<int64_t>>(config.num_experts);
    router->windows_[layer] = std::make_unique<ExpertLoadWindow>(
        static_cast<int>(config.num_experts), router->options_.load_window);
  }
  {
    std::shared_ptr<const PlacementTable> tracked = router->Track(std::move(table));
    MutexLock lock(&router->placement_mu_);
    router->placement_ = std::move(tracked);
  }
  if (router->metrics_ != nullptr) RETURN_IF_ERROR(router->RegisterGauges());
  return router;
}

absl::Status MoeRouter::RegisterGauges() {
  metrics::Registry& registry = metrics_->registry();
  RETURN_IF_ERROR(metrics::AddComputedGauge(
      registry, "moemesh_router_expert_imbalance",
      "Max over mean routed load of the layer's experts in the load window (1 = balanced, "
      "0 = no traffic).",
      [this](std::vector<metrics::Sample>* out) {
        for (const auto& [layer, window] : windows_) {
          out->push_back({"", {{"layer", absl::StrCat(layer)}}, window->Snapshot().imbalance});
        }
      }));
  RETURN_IF_ERROR(metrics::AddComputedGauge(
      registry, "moemesh_router_balance_statistic",
      "E * sum_i f_i * P_i over the load window: f_i share of assignments to expert i, P_i "
      "its mean router probability (1 = balanced).",
      [this](std::vector<metrics::Sample>* out) {
        for (const auto& [layer, window] : windows_) {
          out->push_back(
              {"", {{"layer", absl::StrCat(layer)}}, window->Snapshot().balance_statistic});
        }
      }));
  RETURN_IF_ERROR(metrics::AddComputedGauge(
      registry, "moemesh_router_gpu_fallbacks",
      "Layer calls routed on the CPU because routing on the GPU (--device cuda) failed, since "
      "start.",
      [this](std::vector<metrics::Sample>* out) {
        int64_t n = 0;
        for (const auto& [layer, gate] : gates_) n += gate->gpu_fallbacks();
        out->push_back({"", {}, static_cast<double>(n)});
      }));
  RETURN_IF_ERROR(metrics::AddComputedGauge(
      registry, "moemesh_router_load_window_seconds", "Length of the load window.",
      [this](std::vector<metrics::Sample>* out) {
        out->push_back({"", {}, std::chrono::duration<double>(options_.load_window).count()});
      }));
  RETURN_IF_ERROR(metrics::AddComputedGauge(
      registry, "moemesh_router_placement_epoch", "Epoch of the placement table in force.",
      [this](std::vector<metrics::Sample>* out) {
        out->push_back({"", {}, static_cast<double>(placement()->epoch())});
      }));
  RETURN_IF_ERROR(metrics::AddComputedGauge(
      registry, "moemesh_router_placement_info",
      "Replicas of each (layer, expert): comma-separated endpoints; the value is 1.",
      [this](std::vector<metrics::Sample>* out) {
        const auto table = placement();
        const auto& endpoints = table->endpoints();
        for (int64_t layer : config_.MoeLayers()) {
          if (metrics_->selection().summed() || !metrics_->selection().LayerLabel(layer)) continue;
          for (int32_t e = 0; e < config_.num_experts; ++e) {
            std::vector<std::string> names;
            for (int32_t r : table->Replicas(layer, e)) names.push_back(endpoints[r]);
            out->push_back({"",
                            {{"layer", absl::StrCat(layer)},
                             {"expert", absl::StrCat(e)},
                             {"replicas", absl::StrJoin(names, ",")}},
                            1});
          }
        }
      }));
  ASSIGN_OR_RETURN(ejections_family_,
                   metrics::AddCounter(registry, "moemesh_router_ejections_total",
                                       "Times each expert-service endpoint was ejected (outlier "
                                       "ejection: consecutive failures or timeouts)."));
  RETURN_IF_ERROR(metrics::AddComputedGauge(
      registry, "moemesh_router_destination_ejected",
      "1 while the endpoint is ejected (its experts served by their other replicas).",
      [this](std::vector<metrics::Sample>* out) {
        const int64_t now = SteadyClock::now().time_since_epoch().count();
        ReaderMutexLock lock(&destinations_mu_);
        for (const auto& [endpoint, d] : destinations_) {
          out->push_back({"", {{"destination", endpoint}}, d->Ejected(now) ? 1.0 : 0.0});
        }
      }));
  RETURN_IF_ERROR(metrics::AddComputedGauge(
      registry, "moemesh_router_hedges_total",
      "Destination calls sent again to other replicas after --hedge-after-ms (result=sent), "
      "and those whose answer came first (result=won).",
      [this](std::vector<metrics::Sample>* out) {
        out->push_back({"", {{"result", "sent"}}, static_cast<double>(hedges_sent_.load())});
        out->push_back({"", {{"result", "won"}}, static_cast<double>(hedges_won_.load())});
      }));
  return metrics::AddComputedGauge(
      registry, "moemesh_router_destination_experts",
      "(layer, expert) pairs the placement gives each expert-service endpoint.",
      [this](std::vector<metrics::Sample>* out) {
        const auto table = placement();
        for (const std::string& endpoint : table->endpoints()) {
          out->push_back({"",
                          {{"destination", endpoint}},
                          static_cast<double>(table->ExpertsOf(endpoint).size())});
        }
      });
}

std::shared_ptr<const PlacementTable> MoeRouter::placement() const {
  MutexLock lock(&placement_mu_);
  return placement_;
}

std::shared_ptr<const PlacementTable> MoeRouter::Track(PlacementTable table) {
  const uint64_t epoch = table.epoch();
  {
    MutexLock lock(&live_mu_);
    ++live_[epoch];
  }
  return std::shared_ptr<const PlacementTable>(new PlacementTable(std::move(table)),
                                               [this, epoch](const PlacementTable* t) {
                                                 delete t;
                                                 MutexLock lock(&live_mu_);
                                                 if (--live_[epoch] == 0) live_.erase(epoch);
                                               });
}

absl::Status MoeRouter::CheckHolds(const PlacementTable& table, Clock::time_point deadline) const {
  for (const std::string& endpoint : table.endpoints()) {
    v1::InfoResponse info;
    if (absl::Status s = transport_->Info(endpoint, v1::InfoRequest(), deadline, &info); !s.ok()) {
      return absl::FailedPreconditionError(absl::StrCat("placement epoch ", table.epoch(),
                                                        ": cannot ask ", endpoint,
                                                        " which experts it holds: ", s.message()));
    }
    std::set<std::pair<int64_t, int32_t>> held;
    for (const auto& e : info.experts()) held.insert({e.layer(), e.expert()});
    for (const auto& want : table.ExpertsOf(endpoint)) {
      if (!held.count(want)) {
        return absl::FailedPreconditionError(absl::StrCat("placement epoch ", table.epoch(), ": ",
                                                          endpoint, " does not hold layer ",
                                                          want.first, " expert ", want.second));
      }
    }
  }
  return absl::OkStatus();
}

absl::Status MoeRouter::SetPlacement(PlacementTable table, Clock::time_point deadline) {
  {
    MutexLock lock(&placement_mu_);
    if (table.epoch() <= placement_->epoch()) {
      return absl::FailedPreconditionError(absl::StrCat("placement epoch ", table.epoch(),
                                                        " is not newer than the current ",
                                                        placement_->epoch()));
    }
  }
  RETURN_IF_ERROR(CheckHolds(table, deadline));
  // Tracked outside the placement lock; the old table goes (and is counted) after it.
  const uint64_t epoch = table.epoch();
  std::shared_ptr<const PlacementTable> next = Track(std::move(table));
  std::shared_ptr<const PlacementTable> old;
  {
    MutexLock lock(&placement_mu_);
    if (epoch <= placement_->epoch()) {
      return absl::FailedPreconditionError(absl::StrCat(
          "placement epoch ", epoch, " is not newer than the current ", placement_->epoch()));
    }
    old = std::exchange(placement_, std::move(next));
  }
  return absl::OkStatus();
}

bool MoeRouter::NoOlderTables() const {
  return live_.empty() || live_.begin()->first >= waiting_for_;
}

bool MoeRouter::WaitForOlderCalls(uint64_t epoch, Clock::time_point deadline) {
  MutexLock lock(&live_mu_);
  waiting_for_ = epoch;
  return live_mu_.AwaitWithDeadline(this, &MoeRouter::NoOlderTables, deadline);
}

std::vector<int64_t> MoeRouter::ExpertLoad(int64_t layer) const {
  std::vector<int64_t> out;
  auto it = load_.find(layer);
  if (it == load_.end()) return out;
  for (const auto& c : it->second) out.push_back(c.load(std::memory_order_relaxed));
  return out;
}

ExpertLoadWindow::Stats MoeRouter::LoadStats(int64_t layer) const {
  auto it = windows_.find(layer);
  if (it == windows_.end()) return {};
  return it->second->Snapshot();
}

void MoeRouter::FillExpertLoad(int64_t only, v1::ExpertLoad* out) const {
  for (int64_t layer : config_.MoeLayers()) {
    if (only >= 0 && only != layer) continue;
    v1::LayerLoad* l = out->add_layers();
    l->set_layer(layer);
    for (int64_t v : ExpertLoad(layer)) l->add_tokens(v);
    const ExpertLoadWindow::Stats st = LoadStats(layer);
    for (int64_t v : st.counts) l->add_window_tokens(v);
    for (double v : st.rate) l->add_window_rate(v);
    for (double v : st.mean_probability) l->add_mean_probability(v);
    l->set_window_seconds(st.seconds);
    l->set_imbalance(st.imbalance);
    l->set_balance_statistic(st.balance_statistic);
    l->set_window_input_tokens(st.tokens);
  }
}

MoeRouter::Destination& MoeRouter::DestinationOf(const std::string& endpoint) {
  {
    ReaderMutexLock lock(&destinations_mu_);
    auto it = destinations_.find(endpoint);
    if (it != destinations_.end()) return *it->second;
  }
  MutexLock lock(&destinations_mu_);
  auto& slot = destinations_[endpoint];
  if (!slot) {
    slot = std::make_unique<Destination>();
    if (metrics_ != nullptr) slot->latency = metrics_->DispatchLatency(endpoint);
  }
  return *slot;
}

absl::Status MoeRouter::CheckReady(Clock::time_point deadline) const {
  const auto table = placement();
  if (table->epoch() == 0 && options_.placement_from_controller) {
    return absl::UnavailableError("no placement yet: waiting for the placement controller");
  }
  const absl::Status holds = CheckHolds(*table, deadline);
  return holds.ok() ? holds : absl::UnavailableError(holds.message());
}

// One Forward: inputs, routing, per-expert row blocks and the results coming back.
struct MoeRouter::Call {
  int64_t layer = 0;
  const MoeGate* gate = nullptr;
  std::shared_ptr<const PlacementTable> table;
  Clock::time_point deadline;
  const float* x = nullptr;
  int64_t tokens = 0;
  FreeList<CallBuffers>::Lease buf;  // back to the router's free list however the call ends
};

// Which replicas failed which experts in this call, and why.
struct MoeRouter::Failures {
  explicit Failures(int64_t num_experts) : replicas(num_experts) {}
  std::vector<std::set<int32_t>> replicas;  // per expert: endpoint indices that failed it
  std::map<int32_t, std::string> errors;    // endpoint index -> its last error
};

// Checks a destination's whole reply before any of its rows lands in grouped_y.
absl::Status MoeRouter::TakeReply(Call& c, const std::string& endpoint,
                                  const std::vector<int32_t>& sent, v1::ComputeResponse* response) {
  const DispatchPlan& plan = c.buf->ws.plan;
  const int64_t H = config_.hidden_size;
  if (response->outputs_size() != static_cast<int>(sent.size())) {
    return absl::InternalError(absl::StrCat(endpoint, " returned ", response->outputs_size(),
                                            " batches for ", sent.size()));
  }
  std::vector<Tensor> rows;
  rows.reserve(sent.size());
  for (size_t i = 0; i < sent.size(); ++i) {
    const int32_t e = sent[i];
    const auto& out = response->outputs(static_cast<int>(i));
    const std::string what = absl::StrCat(endpoint, " expert ", e);
    auto t = FromProto(out.rows(), nullptr, what);
    if (!t.ok()) return absl::InternalError(t.status().message());
    if (out.expert() != e || t->shape() != std::vector<int64_t>{plan.rows_of(e), H} ||
        t->dtype() != options_.wire_dtype) {
      return absl::InternalError(
          absl::StrCat(what, ": reply has the wrong expert, shape or dtype"));
    }
    rows.push_back(*std::move(t));
  }
  for (size_t i = 0; i < sent.size(); ++i) {
    const int32_t e = sent[i];
    ConvertToF32(rows[i].dtype(), rows[i].raw(), rows[i].numel(),
                 c.buf->grouped_y.data() + plan.expert_offsets[e] * H);
  }
  return absl::OkStatus();
}

// One destination call of a round: where, which experts, and how it ended.
struct MoeRouter::Sent {
  int32_t dest = 0;
  std::vector<int32_t> experts;
  bool hedge = false;
  bool finished = false;
  absl::Status status;
  SteadyClock::time_point sent_at;
};

// A round's calls (a deque: stable addresses for the replies' callbacks, hedges added
// while calls fly) and which experts have an answer.
struct MoeRouter::Round {
  std::deque<Sent> sent;
  std::vector<char> answered;  // per expert
  int64_t unanswered = 0;      // experts of this round without an answer
};

absl::StatusOr<MoeRouter::Assignment> MoeRouter::ChooseReplicas(const Call& c,
                                                                const std::vector<int32_t>& pending,
                                                                const Failures& failures,
                                                                bool partial) {
  const auto& endpoints = c.table->endpoints();
  const int64_t now = SteadyClock::now().time_since_epoch().count();
  // Ties go round: each call starts its scan at the next replica, so idle replicas share
  // the calls (an expert's load spreads over its replicas, as the planner assumes).
  const uint64_t rotation = rotation_.fetch_add(1, std::memory_order_relaxed);
  Assignment by_dest;
  for (int32_t e : pending) {
    int32_t best = -1;
    int64_t best_load = 0;
    bool best_ejected = false;
    const std::vector<int32_t>& replicas = c.table->Replicas(c.layer, e);
    for (size_t i = 0; i < replicas.size(); ++i) {
      const int32_t r = replicas[(rotation + i) % replicas.size()];
      if (failures.replicas[e].count(r)) continue;
      const Destination& d = DestinationOf(endpoints[r]);
      const bool ejected = d.Ejected(now);
      const int64_t load = d.outstanding.load(std::memory_order_relaxed);
      // An ejected replica only when no other is left.
      if (best < 0 || (best_ejected && !ejected) || (best_ejected == ejected && load < best_load)) {
        best = r;
        best_load = load;
        best_ejected = ejected;
      }
    }
    if (best < 0 && partial) continue;
    if (best < 0 && c.table->Replicas(c.layer, e).empty()) {
      return absl::UnavailableError(
          c.table->epoch() == 0
              ? "no placement yet: the router waits for its placement controller"
              : absl::StrCat("layer ", c.layer, " expert ", e,
                             " has no replica in placement epoch ", c.table->epoch()));
    }
    if (best < 0) {
      std::vector<std::string> why;
      for (int32_t r : c.table->Replicas(c.layer, e)) {
        const auto it = failures.errors.find(r);
        why.push_back(
            absl::StrCat(endpoints[r], ": ", it == failures.errors.end() ? "" : it->second));
      }
      return absl::UnavailableError(absl::StrCat("layer ", c.layer, " expert ", e,
                                                 ": every replica failed (",
                                                 absl::StrJoin(why, "; "), ")"));
    }
    by_dest[best].push_back(e);
  }
  return by_dest;
}

bool MoeRouter::MayEject(const PlacementTable& table, int64_t now_ns) const {
  const auto& endpoints = table.endpoints();
  int64_t ejected = 0;
  {
    ReaderMutexLock lock(&destinations_mu_);
    for (const std::string& endpoint : endpoints) {
      auto it = destinations_.find(endpoint);
      if (it != destinations_.end() && it->second->Ejected(now_ns)) ++ejected;
    }
  }
  return static_cast<double>(ejected + 1) <=
         options_.resilience.eject_max_share * static_cast<double>(endpoints.size());
}

void MoeRouter::RecordOutcome(Destination& d, const std::string& endpoint,
                              const absl::Status& status, const PlacementTable& table) {
  const ResilienceOptions& o = options_.resilience;
  if (o.eject_after <= 0 || status.code() == absl::StatusCode::kCancelled) return;
  const bool failed = status.code() == absl::StatusCode::kUnavailable ||
                      status.code() == absl::StatusCode::kDeadlineExceeded;
  const auto now = SteadyClock::now();
  const int64_t now_ns = now.time_since_epoch().count();
  MutexLock lock(&d.mu);
  if (!failed) {
    d.consecutive_failures = 0;
    // Back for longer than the longest ejection: the next one starts from the base again.
    if (!d.probation && d.ejections > 0 &&
        now_ns - d.ejected_until_ns.load() >
            std::chrono::duration_cast<std::chrono::nanoseconds>(o.eject_max).count()) {
      d.ejections = 0;
    }
    d.probation = false;
    return;
  }
  ++d.consecutive_failures;
  if (d.Ejected(now_ns)) return;
  if (!d.probation && d.consecutive_failures < o.eject_after) return;
  if (!MayEject(table, now_ns)) return;
  const auto span = std::min<std::chrono::nanoseconds>(
      o.eject_base * (int64_t{1} << std::min(d.ejections, 30)), o.eject_max);
  d.ejected_until_ns.store(now_ns + span.count());
  ++d.ejections;
  d.consecutive_failures = 0;
  d.probation = true;
  if (ejections_family_ != nullptr) ejections_family_->Add({{"destination", endpoint}}).Increment();
  std::fprintf(
      stderr, "router: %s ejected for %lld ms (ejection %d in a row): %s\n", endpoint.c_str(),
      static_cast<long long>(std::chrono::duration_cast<std::chrono::milliseconds>(span).count()),
      d.ejections, std::string(status.message()).c_str());
}

std::vector<std::string> MoeRouter::Ejected() const {
  const int64_t now = SteadyClock::now().time_since_epoch().count();
  std::vector<std::string> out;
  ReaderMutexLock lock(&destinations_mu_);
  for (const auto& [endpoint, d] : destinations_) {
    if (d->Ejected(now)) out.push_back(endpoint);
  }
  return out;
}

absl::Status MoeRouter::SendTo(Call& c, ExpertTransport::Exchange& exchange, Round& round,
                               Sent& s) {
  const DispatchPlan& plan = c.buf->ws.plan;
  const int64_t H = config_.hidden_size;
  const std::string& endpoint = c.table->endpoints()[s.dest];
  // Built where the transport sends it from: each expert's rows converted to the wire dtype
  // once, straight into the outgoing buffer.
  int64_t tokens = 0;
  for (int32_t e : s.experts) tokens += plan.rows_of(e);
  auto request =
      exchange.NewRequest(static_cast<size_t>(tokens * H) * DTypeSize(options_.wire_dtype),
                          static_cast<int>(s.experts.size()));
  request->request().set_layer(c.layer);
  request->request().set_placement_epoch(c.table->epoch());
  request->request().set_output_dtype(ToProtoDType(options_.wire_dtype));
  for (int32_t e : s.experts) {
    const int64_t n = plan.rows_of(e), off = plan.expert_offsets[e];
    char* out = request->AddRows(e, options_.wire_dtype, {n, H});
    if (out == nullptr) {
      return absl::ResourceExhaustedError(
          absl::StrCat(endpoint, ": no memory for a request of ", tokens, " rows"));
    }
    const Tensor rows =
        Tensor::View(DType::kF32, {n, H}, c.buf->grouped_x.data() + off * H, nullptr);
    RETURN_IF_ERROR(ToWire(rows, options_.wire_dtype, out));
  }
  Destination& d = DestinationOf(endpoint);
  d.outstanding.fetch_add(tokens, std::memory_order_relaxed);
  destination_calls_.fetch_add(1, std::memory_order_relaxed);
  s.sent_at = SteadyClock::now();
  // The reply is checked and converted on this thread, inside the exchange's Wait. Replicas
  // compute the same bits, so a hedge's answer and the original's are interchangeable.
  exchange.Send(
      endpoint, std::move(request),
      [this, &c, &d, &endpoint, &round, &s, tokens](const absl::Status& status,
                                                    v1::ComputeResponse* response) {
        d.outstanding.fetch_sub(tokens, std::memory_order_relaxed);
        if (d.latency != nullptr && !absl::IsCancelled(status)) {
          d.latency->Observe(std::chrono::duration<double>(SteadyClock::now() - s.sent_at).count());
          if (!status.ok()) metrics_->CountDispatchFailure(endpoint, status.code());
        }
        RecordOutcome(d, endpoint, status, *c.table);
        s.finished = true;
        s.status = status.ok() ? TakeReply(c, endpoint, s.experts, response) : status;
        if (!s.status.ok()) return;
        bool first = false;
        for (int32_t e : s.experts) {
          if (round.answered[e]) continue;
          round.answered[e] = 1;
          --round.unanswered;
          first = true;
        }
        if (s.hedge && first) hedges_won_.fetch_add(1, std::memory_order_relaxed);
      });
  return absl::OkStatus();
}

void MoeRouter::Hedge(Call& c, ExpertTransport::Exchange& exchange, Round& round,
                      const Failures& failures) {
  const size_t originals = round.sent.size();
  for (size_t i = 0; i < originals; ++i) {
    // Not by reference: hedges are appended to round.sent below.
    if (round.sent[i].finished) continue;
    const double budget = options_.resilience.hedge_budget *
                          static_cast<double>(destination_calls_.load(std::memory_order_relaxed));
    if (static_cast<double>(hedges_sent_.load(std::memory_order_relaxed)) + 1 > budget) break;
    Failures avoid = failures;
    for (int32_t e : round.sent[i].experts) avoid.replicas[e].insert(round.sent[i].dest);
    absl::StatusOr<Assignment> alternatives =
        ChooseReplicas(c, round.sent[i].experts, avoid, /*partial=*/true);
    if (!alternatives.ok()) continue;
    for (auto& [dest, experts] : *alternatives) {
      round.sent.push_back({dest, std::move(experts), /*hedge=*/true});
      if (!SendTo(c, exchange, round, round.sent.back()).ok()) {
        round.sent.pop_back();  // no memory for it: the original goes on alone
        continue;
      }
      hedges_sent_.fetch_add(1, std::memory_order_relaxed);
    }
  }
}

absl::Status MoeRouter::CollectRetries(const Call& c, const Round& round, Failures& failures,
                                       std::vector<int32_t>* pending) {
  pending->clear();
  std::set<int32_t> retry;
  for (const Sent& s : round.sent) {
    if (s.status.ok() || absl::IsCancelled(s.status)) continue;
    bool needed = false;  // some of its experts have no answer from another call
    for (int32_t e : s.experts) needed = needed || !round.answered[e];
    if (!needed) continue;
    // Only an unreachable service, or one that no longer holds the expert (a placement
    // change raced the call), is worth another replica; anything else (a bad request, an
    // expired deadline) would fail the same way there.
    if (s.status.code() != absl::StatusCode::kUnavailable &&
        s.status.code() != absl::StatusCode::kNotFound) {
      return absl::Status(s.status.code(),
                          absl::StrCat(c.table->endpoints()[s.dest], ": ", s.status.message()));
    }
    failures.errors[s.dest] = std::string(s.status.message());
    for (int32_t e : s.experts) {
      if (round.answered[e]) continue;
      failures.replicas[e].insert(s.dest);
      retry.insert(e);
    }
  }
  pending->assign(retry.begin(), retry.end());
  return absl::OkStatus();
}

absl::Status MoeRouter::Dispatch(Call& c) {
  const DispatchPlan& plan = c.buf->ws.plan;
  const int64_t E = config_.num_experts;
  std::vector<int32_t> pending;  // experts whose rows still need computing
  for (int64_t e = 0; e < E; ++e) {
    if (plan.rows_of(static_cast<int>(e)) > 0) pending.push_back(static_cast<int32_t>(e));
  }
  Failures failures(E);
  bool shared_done = false;
  const auto hedge_after = options_.resilience.hedge_after;
  while (!pending.empty()) {
    ASSIGN_OR_RETURN(Assignment by_dest, ChooseReplicas(c, pending, failures));
    // Declared before the exchange: its destructor waits for the calls that write it.
    Round round;
    round.answered.assign(E, 1);
    for (int32_t e : pending) round.answered[e] = 0;
    round.unanswered = static_cast<int64_t>(pending.size());
    auto exchange = transport_->NewExchange(c.deadline);
    for (auto& [dest, experts] : by_dest) {
      round.sent.push_back({dest, std::move(experts)});
      RETURN_IF_ERROR(SendTo(c, *exchange, round, round.sent.back()));
    }
    const auto sent_at = Clock::now();
    // The shared expert runs here while the calls fly (first round only).
    if (!shared_done) c.gate->RunSharedExpert(c.x, c.tokens, &c.buf->ws);
    shared_done = true;
    if (hedge_after.count() > 0 && !exchange->WaitUntil(sent_at + hedge_after, nullptr)) {
      Hedge(c, *exchange, round, failures);
      // Every expert's first answer is enough; the calls left are cancelled (their `done`
      // runs with CANCELLED), or all calls end (some failed: retried below).
      if (!exchange->WaitUntil(Clock::time_point::max(),
                               [&round] { return round.unanswered == 0; })) {
        exchange->CancelAll();
      }
    }
    exchange->Wait();
    RETURN_IF_ERROR(CollectRetries(c, round, failures, &pending));
  }
  if (!shared_done) c.gate->RunSharedExpert(c.x, c.tokens, &c.buf->ws);  // no routed rows at all
  return absl::OkStatus();
}

void MoeRouter::Route(Call& c, MoeLayerOutput& out) {
  const int64_t H = config_.hidden_size, T = c.tokens;
  c.buf->ws.want_prob_sums = true;
  c.gate->Route(c.x, T, out.topk_ids.mutable_data<int32_t>(),
                out.topk_weights.mutable_data<float>(), &c.buf->ws);
  const DispatchPlan& plan = c.buf->ws.plan;
  const int64_t R = plan.num_rows();
  Sized(c.buf->grouped_y, R * H);
  GatherRows(c.x, H, plan, 0, R, Sized(c.buf->grouped_x, R * H));
  auto& load = load_.at(c.layer);
  std::vector<int64_t>& counts = c.buf->counts;
  counts.resize(config_.num_experts);
  for (int64_t e = 0; e < config_.num_experts; ++e) {
    counts[e] = plan.rows_of(static_cast<int>(e));
    load[e].fetch_add(counts[e], std::memory_order_relaxed);
  }
  windows_.at(c.layer)->Add(T, counts.data(), c.buf->ws.prob_sums.data());
  if (metrics_ != nullptr) metrics_->CountRouted(c.layer, T, counts, plan.dropped);
  out.dropped = plan.dropped;
}

absl::StatusOr<MoeLayerOutput> MoeRouter::Forward(int64_t layer, const Tensor& hidden,
                                                  Clock::time_point deadline) {
  auto gate = gates_.find(layer);
  if (gate == gates_.end()) {
    RETURN_IF_ERROR(config_.CheckMoeLayer(layer));
    return absl::InvalidArgumentError(absl::StrCat("layer ", layer, " is not served"));
  }
  const int64_t H = config_.hidden_size, k = config_.top_k;
  ASSIGN_OR_RETURN(const Tensor x, HiddenStatesAsF32(hidden, H));
  const int64_t T = x.dim(0);
  const auto started = std::chrono::steady_clock::now();
  Call c{layer, gate->second.get(), placement(), deadline, x.data<float>(), T, buffers_.Take()};
  MoeLayerOutput out;
  out.topk_ids = Tensor::Empty(DType::kI32, {T, k});
  out.topk_weights = Tensor::Empty(DType::kF32, {T, k});
  Route(c, out);
  RETURN_IF_ERROR(Dispatch(c));
  Tensor y = Tensor::Empty(DType::kF32, {T, H});
  c.gate->Combine(c.buf->grouped_y.data(), c.x, T, c.buf->ws, y.mutable_data<float>());
  ASSIGN_OR_RETURN(out.output, OutputAs(std::move(y), hidden.dtype()));
  if (metrics_ != nullptr) {
    metrics_->ObserveLayer(
        std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count());
  }
  return out;
}

}  // namespace moemesh
