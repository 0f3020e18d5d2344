// PlacementController: the one owner of a model's placement (`moemesh controller`,
// proto/controller.proto). Expert services register with it and keep a lease; routers
// watch the placement it publishes and acknowledge each epoch; every rebalance interval
// (or at once when an expert lacks replicas, a service joins, leaves or dies, or an
// operator asks) it plans a new placement from the routers' load (services/mesh/planner.h)
// and carries it out make-before-break:
//   1. the new holders load their experts (LoadExperts) and confirm they hold them (Info);
//   2. the new epoch is published to every router;
//   3. every router acknowledges it, having finished its calls planned on older epochs;
//   4. the old holders unload what they no longer hold.
// Every step has a timeout; a step that fails aborts the round (nothing published before
// step 2; after it, the old holders keep their copies until a later round can unload them),
// is logged and counted. A service that stops heartbeating is dropped when its lease
// expires and its experts re-homed. Restarted, the controller waits one lease for the
// services to re-register and the routers to re-watch, takes the newest placement a router
// serves, and continues above its epoch: no state file.
//
// Threads: gRPC handlers on gRPC's threads, rounds on a thread of its own; all state under
// one lock, released while RPCs to the services run.
#pragma once

#include <grpcpp/grpcpp.h>

#include <chrono>
#include <cstdint>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "controller.grpc.pb.h"
#include "expert_service.grpc.pb.h"
#include "services/base/mutex.h"
#include "services/mesh/planner.h"
#include "services/metrics/metrics.h"
#include "services/model/model_config.h"
#include "services/rpc/security.h"

namespace moemesh {

struct ControllerOptions {
  // The model whose placement this is (its config: MoE layers, experts).
  std::string model_dir;
  std::string listen = "127.0.0.1:0";
  // Seconds between rebalancing rounds; 0: only on request (and for required changes).
  std::chrono::milliseconds rebalance_interval{10000};
  // Ready replicas every (layer, expert) keeps, on distinct services, whenever that many
  // services exist.
  int min_replicas = 1;
  // Most (layer, expert) pairs one service holds; 0: every expert fits.
  int expert_slots = 0;
  // A registration lives this long without a heartbeat.
  std::chrono::milliseconds lease{3000};
  // After a start, nothing is planned for max(lease, settle): services re-register and
  // routers (whose watch retries at most every 500 ms) report the placement they serve.
  std::chrono::milliseconds settle{2000};
  // Hysteresis of the planner (PlannerOptions::min_gain).
  double min_gain = 0.10;
  // Step timeouts: loading experts on a service, every router acknowledging an epoch.
  std::chrono::milliseconds load_timeout{120000};
  std::chrono::milliseconds ack_timeout{45000};
  int max_message_bytes = 64 << 20;
  // A service that every router reporting load has ejected (outlier ejection) for this long
  // is treated as failed: its experts are re-homed as when its lease expires. 0: never.
  std::chrono::milliseconds ejected_failed{0};
  // Where the metrics go (docs/metrics.md); not owned; nullptr: none.
  metrics::Registry* registry = nullptr;
  // TLS, the identity every call needs, and the credentials the controller dials expert
  // services with (services/rpc/security.h); null: plaintext, unchecked.
  std::shared_ptr<Security> security;

  absl::Status Validate() const;
};

class PlacementController {
 public:
  static absl::StatusOr<std::unique_ptr<PlacementController>> Create(ControllerOptions options);
  ~PlacementController();
  PlacementController(const PlacementController&) = delete;
  PlacementController& operator=(const PlacementController&) = delete;

  int port() const { return port_; }
  // Health NOT_SERVING, stop the rounds, close the watch streams, stop the server.
  void Shutdown(std::chrono::system_clock::time_point deadline);
  void Wait();

 private:
  class Service;
  struct Metrics;
  // An expert service as the controller knows it.
  struct Member {
    std::string endpoint, service_id;
    enum class State { kJoining, kReady, kDraining, kGone } state = State::kJoining;
    std::chrono::steady_clock::time_point lease_until;
    int64_t expert_bytes = 0;
    std::set<std::pair<int64_t, int32_t>> holds;  // as last registered or loaded
    // Since when every reporting router ejects it (the epoch of the clock: not all do).
    std::chrono::steady_clock::time_point ejected_since{};
    std::unique_ptr<v1::ExpertService::Stub> stub;
  };
  struct Router {
    uint64_t acked_epoch = 0;
    uint64_t refused_epoch = 0;  // the last epoch it refused, and why
    std::string refusal;
    int streams = 0;                // watch streams open
    std::set<std::string> ejected;  // endpoints it ejects, from its last load report
    std::chrono::steady_clock::time_point last_seen;
    v1::ExpertLoad load;
    std::chrono::steady_clock::time_point load_at;
  };
  // One round's outcome, for Rebalance and the logs.
  struct RoundResult {
    uint64_t epoch = 0;
    int64_t added = 0, removed = 0;
    std::string note;
  };

  PlacementController() = default;
  absl::Status RegisterMetrics();
  void RoundLoop();
  // Plans and carries out one round; `forced`: an operator's request (publishes even a
  // gain below the hysteresis? no: it runs now, whatever the interval).
  absl::StatusOr<RoundResult> RunRound(bool forced) ABSL_LOCKS_EXCLUDED(mu_);
  // The steps of a round.
  absl::StatusOr<PlannerInput> PlannerInputLocked(std::vector<std::string>* order)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::Status LoadOnHolders(const std::vector<std::string>& order, const Plan& plan)
      ABSL_LOCKS_EXCLUDED(mu_);
  void UnloadFromOldHolders(const std::vector<std::string>& order, const Plan& plan)
      ABSL_LOCKS_EXCLUDED(mu_);
  // Publishes `placement` (services by index into `order`) as the next epoch; its epoch.
  uint64_t PublishLocked(const std::vector<std::string>& order,
                         const std::map<int64_t, std::vector<std::vector<int>>>& placement)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Whether every router known acknowledged `epoch` by `deadline`.
  absl::Status WaitAcked(uint64_t epoch, std::chrono::steady_clock::time_point deadline)
      ABSL_LOCKS_EXCLUDED(mu_);
  bool AllAcked() const ABSL_SHARED_LOCKS_REQUIRED(mu_);
  // Joining services that hold all the placement in force (every router serving it) gives
  // them become ready.
  void PromoteJoinersLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void ExpireLeasesLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // With ejected_failed: a service every reporting router has ejected for that long is
  // treated as failed, as when its lease expires.
  void ExpireEjectedLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Routers that reported within a lease, and how many of them eject `endpoint`.
  std::pair<int, int> EjectionVotesLocked(const std::string& endpoint) const
      ABSL_SHARED_LOCKS_REQUIRED(mu_);
  // Services that hold experts the placement does not give them (a round aborted after its
  // publish, a restart): unloaded once every router serves an epoch without them.
  void CollectGarbage() ABSL_LOCKS_EXCLUDED(mu_);
  // Whether some (layer, expert) has fewer replicas than it should: a round is due now.
  bool NeedsRepairLocked() const ABSL_SHARED_LOCKS_REQUIRED(mu_);
  void Trigger() ABSL_LOCKS_EXCLUDED(mu_);
  bool Wakeup() const ABSL_SHARED_LOCKS_REQUIRED(mu_) { return triggered_ || stopping_; }
  // Blocks a Leave or Drain until the placement no longer names `endpoint` and every
  // router has acknowledged that, or until `deadline`.
  absl::StatusOr<uint64_t> DrainMember(const std::string& endpoint,
                                       std::chrono::system_clock::time_point deadline)
      ABSL_LOCKS_EXCLUDED(mu_);
  v1::ControllerState StateLocked() const ABSL_SHARED_LOCKS_REQUIRED(mu_);
  Member* MemberLocked(const std::string& endpoint) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  ControllerOptions options_;
  MoeModelConfig config_;
  std::vector<int64_t> layers_;  // MoE layers
  std::unique_ptr<Service> service_;
  std::unique_ptr<grpc::Server> server_;
  int port_ = 0;
  std::unique_ptr<Metrics> metrics_;

  mutable Mutex mu_;
  std::chrono::steady_clock::time_point started_;
  bool settled_ ABSL_GUARDED_BY(mu_) = false;  // max(lease, settle) after start
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  bool triggered_ ABSL_GUARDED_BY(mu_) = false;
  std::map<std::string, Member> members_ ABSL_GUARDED_BY(mu_);  // by endpoint
  std::map<std::string, Router> routers_ ABSL_GUARDED_BY(mu_);  // by router id
  // The placement in force: epoch 0 and no entries until the first one.
  v1::Placement placement_ ABSL_GUARDED_BY(mu_);
  // The highest epoch any router has served: the next one goes above it.
  uint64_t epoch_floor_ ABSL_GUARDED_BY(mu_) = 0;
  std::string moving_ ABSL_GUARDED_BY(mu_);  // the round in progress, described
  int64_t moves_ ABSL_GUARDED_BY(mu_) = 0, aborted_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t bytes_moved_ ABSL_GUARDED_BY(mu_) = 0;
  std::map<int64_t, LayerPlan> last_layers_ ABSL_GUARDED_BY(mu_);
  CondVar changed_;  // a new epoch, an ack, a stop: the watch streams and waits look again
  Mutex round_mu_;   // one round at a time (the loop's, an operator's)
  std::thread rounds_;
};

}  // namespace moemesh
