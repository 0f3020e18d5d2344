// MoeRouter: one MoE layer call served by the mesh. It computes the gates exactly as the
// in-process MoeLayer does (the same MoeGate), sends each destination expert service
// one request holding all its tokens grouped by expert — all destinations in parallel,
// no thread blocked per call — runs the shared expert locally meanwhile, and combines in
// each token's fixed order. Its output is therefore bit-identical to MoeLayer with the
// same wire dtype, whatever the placement, replica or arrival order.
//
// Placement: an immutable PlacementTable swapped whole (SetPlacement); a call keeps the
// table it started with. Replica choice: the replica with the fewest outstanding tokens,
// ties taken in turn.
// A destination that fails with UNAVAILABLE, or NOT_FOUND (it no longer holds an expert:
// a placement change raced the call), is retried on another replica of each of its
// experts while the deadline allows; an expert whose every replica failed gives
// UNAVAILABLE naming it. Destinations that keep failing are ejected for a while, and
// slow ones hedged (ResilienceOptions).
//
// Thread-safe: Forward may be called concurrently.
#pragma once

#include <atomic>
#include <chrono>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "router_service/router_metrics.h"
#include "services/base/mutex.h"
#include "services/base/scratch.h"
#include "services/mesh/load_stats.h"
#include "services/mesh/placement.h"
#include "services/model/checkpoint.h"
#include "services/model/model_config.h"
#include "services/moe/layer_io.h"
#include "services/moe/moe_gate.h"
#include "services/transport/transport.h"

namespace moemesh {

// How the router handles slow and failing destinations (docs/architecture.md, "Failure
// handling").
struct ResilienceOptions {
  // Outlier ejection: a destination whose calls fail UNAVAILABLE or DEADLINE_EXCEEDED
  // `eject_after` times in a row (0: never) is ejected — its experts go to their other
  // replicas — for eject_base, doubled at each ejection in a row up to eject_max. When the
  // time is up it is back on probation: its next failure ejects it again at once, a success
  // takes it back. Never more than eject_max_share of the placement's endpoints are ejected
  // at once; an expert whose every replica is ejected is still sent to one.
  int eject_after = 5;
  std::chrono::milliseconds eject_base{1000};
  std::chrono::milliseconds eject_max{30000};
  double eject_max_share = 0.5;
  // Hedging: a destination call still unanswered hedge_after (0: never) after it was sent
  // is sent again to other replicas of its experts; each expert takes the first answer
  // (replicas compute the same bits), and the calls left are cancelled. Hedged calls stay
  // within hedge_budget of the destination calls made.
  std::chrono::milliseconds hedge_after{0};
  double hedge_budget = 0.1;

  absl::Status Validate() const;
};

struct RouterOptions {
  std::string model_dir;
  // Expert service endpoints, for the policy-built placement.
  std::vector<std::string> endpoints;
  PlacementPolicy policy = PlacementPolicy::kContiguous;
  int replicas = 1;
  // A JSON placement (PlacementTable::FromJson) instead of policy + endpoints.
  std::string placement_file;
  // Neither: the placement comes from a placement controller (router_service/
  // placement_watcher.h); until its first table arrives, calls fail UNAVAILABLE.
  bool placement_from_controller = false;
  // Token rows on the wire: F32 or BF16.
  DType wire_dtype = DType::kF32;
  // Deadline of a call whose caller gave none.
  std::chrono::milliseconds default_timeout{30000};
  // Span of the windowed load statistics (LoadStats, imbalance gauges).
  std::chrono::milliseconds load_window{60000};
  GateOptions gate;
  ResilienceOptions resilience;

  absl::Status Validate() const;
};

class MoeRouter {
 public:
  using Clock = ExpertTransport::Clock;

  // With `metrics`, the router updates them and registers its computed gauges
  // (imbalance, balance statistic, placement) in metrics->registry(): that registry must
  // not be collected after the router is gone.
  static absl::StatusOr<std::unique_ptr<MoeRouter>> Create(
      RouterOptions options, std::shared_ptr<ExpertTransport> transport,
      std::shared_ptr<RouterMetrics> metrics = nullptr);

  // hidden_states [T, H] (F32, BF16, F16) through MoE layer `layer`.
  absl::StatusOr<MoeLayerOutput> Forward(int64_t layer, const Tensor& hidden_states,
                                         Clock::time_point deadline);

  const MoeModelConfig& config() const { return config_; }
  const RouterOptions& options() const { return options_; }
  std::shared_ptr<const PlacementTable> placement() const;
  // Replaces the table; its epoch must exceed the current one (else FAILED_PRECONDITION),
  // and every endpoint it names must answer Info by `deadline` holding the experts the
  // table gives it (else FAILED_PRECONDITION naming the endpoint and expert). Calls already
  // planned on the old table finish on it.
  absl::Status SetPlacement(PlacementTable table,
                            Clock::time_point deadline = Clock::now() + std::chrono::seconds(10));
  // OK when every endpoint of `table` answers Info by `deadline` holding the experts the
  // table gives it; else FAILED_PRECONDITION naming the first endpoint and expert not held
  // (or the endpoint that did not answer).
  absl::Status CheckHolds(const PlacementTable& table, Clock::time_point deadline) const;
  // Blocks until no call planned on a table older than `epoch` is in flight, or until
  // `deadline`; whether none is.
  bool WaitForOlderCalls(uint64_t epoch, Clock::time_point deadline);
  // Tokens routed to each expert of `layer` since start (empty for a non-MoE layer).
  std::vector<int64_t> ExpertLoad(int64_t layer) const;
  // The load of `layer` over the last options().load_window (zeros for a non-MoE layer).
  ExpertLoadWindow::Stats LoadStats(int64_t layer) const;
  // Both, as RouterControl.GetExpertLoad and the controller's load reports carry them:
  // every MoE layer, or only `layer` when >= 0.
  void FillExpertLoad(int64_t layer, v1::ExpertLoad* out) const;
  // nullptr when the router was created without metrics.
  RouterMetrics* metrics() const { return metrics_.get(); }
  // OK when every endpoint of the placement answers Info holding the experts the table
  // gives it; else UNAVAILABLE naming the first that does not.
  absl::Status CheckReady(Clock::time_point deadline) const;
  // The endpoints ejected now (outlier ejection), and hedged calls so far (sent, won).
  std::vector<std::string> Ejected() const ABSL_LOCKS_EXCLUDED(destinations_mu_);
  int64_t hedges_sent() const { return hedges_sent_.load(); }
  int64_t hedges_won() const { return hedges_won_.load(); }

 private:
  using SteadyClock = std::chrono::steady_clock;
  struct Call;      // one Forward's state
  struct Failures;  // which replicas failed which experts in a call
  struct Round;     // one round of destination calls
  struct Sent;      // one destination call of a round
  // Scratch of one call, reused through a free list.
  struct CallBuffers {
    MoeGate::Workspace ws;
    std::vector<float> grouped_x, grouped_y;
    std::vector<int64_t> counts;  // rows per expert
  };
  // Endpoint index -> the experts sent there in one round.
  using Assignment = std::map<int32_t, std::vector<int32_t>>;

  MoeRouter(RouterOptions options, MoeModelConfig config, std::shared_ptr<ExpertTransport> t,
            std::shared_ptr<RouterMetrics> metrics)
      : options_(std::move(options)),
        config_(std::move(config)),
        transport_(std::move(t)),
        metrics_(std::move(metrics)) {}

  // Per expert-service endpoint: tokens in flight there (replica choice), its latency
  // histogram (null without metrics), and its outlier-ejection state.
  struct Destination {
    std::atomic<int64_t> outstanding{0};
    metrics::Histogram* latency = nullptr;
    // Steady-clock nanoseconds until which it is ejected (read without the lock).
    std::atomic<int64_t> ejected_until_ns{0};
    Mutex mu;
    int consecutive_failures ABSL_GUARDED_BY(mu) = 0;
    int ejections ABSL_GUARDED_BY(mu) = 0;       // in a row: the next one lasts 2^this × base
    bool probation ABSL_GUARDED_BY(mu) = false;  // ejected before; its next outcome decides
    bool Ejected(int64_t now_ns) const { return ejected_until_ns.load() > now_ns; }
  };
  Destination& DestinationOf(const std::string& endpoint) ABSL_LOCKS_EXCLUDED(destinations_mu_);
  absl::Status RegisterGauges();

  // A Forward's steps: route (gates, plan, gather, load counts), dispatch, combine.
  void Route(Call& call, MoeLayerOutput& out);
  // Rounds of: choose a replica per expert, send each destination its request, run the
  // shared expert meanwhile (first round), wait; UNAVAILABLE destinations' experts are
  // retried on other replicas while the deadline allows.
  absl::Status Dispatch(Call& call);
  // For each pending expert, the replica with the fewest outstanding tokens among those
  // that have not failed it, ejected ones only when no other is left; UNAVAILABLE naming
  // the expert when none is left (with `partial`, such experts are left out instead).
  absl::StatusOr<Assignment> ChooseReplicas(const Call& call, const std::vector<int32_t>& pending,
                                            const Failures& failures, bool partial = false);
  // Builds the request of `sent` (its destination and experts) in place and sends it; the
  // reply's outcome goes to `sent` and `round` inside the exchange's Wait.
  absl::Status SendTo(Call& call, ExpertTransport::Exchange& exchange, Round& round, Sent& sent);
  // While calls of the round are unanswered after hedge_after: sends their experts to
  // other replicas (within the budget), then waits for every expert's first answer.
  void Hedge(Call& call, ExpertTransport::Exchange& exchange, Round& round,
             const Failures& failures);
  // After a round: experts answered by any call are done; the experts of calls that failed
  // UNAVAILABLE or NOT_FOUND go back to `pending`; any other error ends the call.
  absl::Status CollectRetries(const Call& call, const Round& round, Failures& failures,
                              std::vector<int32_t>* pending);
  // Outlier ejection's bookkeeping for one destination call's outcome.
  void RecordOutcome(Destination& d, const std::string& endpoint, const absl::Status& status,
                     const PlacementTable& table) ABSL_LOCKS_EXCLUDED(d.mu);
  // Whether one more of `table`'s endpoints may be ejected (eject_max_share).
  bool MayEject(const PlacementTable& table, int64_t now_ns) const
      ABSL_LOCKS_EXCLUDED(destinations_mu_);
  absl::Status TakeReply(Call& call, const std::string& endpoint, const std::vector<int32_t>& sent,
                         v1::ComputeResponse* response);

  const RouterOptions options_;
  const MoeModelConfig config_;
  std::shared_ptr<ExpertTransport> transport_;
  const std::shared_ptr<RouterMetrics> metrics_;
  std::unique_ptr<Checkpoint> ckpt_;
  std::map<int64_t, std::unique_ptr<MoeGate>> gates_;  // per MoE layer; immutable after Create
  std::map<int64_t, std::vector<std::atomic<int64_t>>> load_;     // routed tokens per expert
  std::map<int64_t, std::unique_ptr<ExpertLoadWindow>> windows_;  // per MoE layer

  // Shares `table` so that the table's going (its last call done) is counted in live_.
  std::shared_ptr<const PlacementTable> Track(PlacementTable table);
  bool NoOlderTables() const ABSL_SHARED_LOCKS_REQUIRED(live_mu_);

  // Tables still referenced (by the router or by calls in flight), by epoch. Before
  // placement_: the table's deleter counts here, so this outlives it.
  mutable Mutex live_mu_;
  std::map<uint64_t, int> live_ ABSL_GUARDED_BY(live_mu_);
  uint64_t waiting_for_ ABSL_GUARDED_BY(live_mu_) = 0;  // the epoch WaitForOlderCalls waits on
  mutable Mutex placement_mu_;
  std::shared_ptr<const PlacementTable> placement_ ABSL_GUARDED_BY(placement_mu_);

  FreeList<CallBuffers> buffers_;
  std::atomic<uint64_t> rotation_{0};  // ChooseReplicas' tie-break
  // Destination calls made, hedges sent and won (the hedge budget; metrics).
  std::atomic<int64_t> destination_calls_{0};
  std::atomic<int64_t> hedges_sent_{0};
  std::atomic<int64_t> hedges_won_{0};
  metrics::Family<metrics::Counter>* ejections_family_ = nullptr;  // with metrics

  mutable SharedMutex destinations_mu_;
  std::map<std::string, std::unique_ptr<Destination>> destinations_
      ABSL_GUARDED_BY(destinations_mu_);
};

}  // namespace moemesh
