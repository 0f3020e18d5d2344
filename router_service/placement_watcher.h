// PlacementWatcher: how a router follows its placement controller (`moemesh router
// --controller H:P`). It keeps a WatchPlacement stream open, applies each new epoch to the
// router (SetPlacement), waits until no call planned on an older table is in flight, then
// acknowledges the epoch; and it reports the router's load windows every report interval.
// While the controller is down or restarting, the router keeps serving its last placement
// and the watcher reconnects (backoff up to 2 s), telling the controller what it serves.
//
// Threads: two of its own; Start and the destructor from one thread.
#pragma once

#include <atomic>
#include <chrono>
#include <memory>
#include <string>
#include <thread>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "controller.grpc.pb.h"
#include "router_service/router.h"
#include "services/base/mutex.h"
#include "services/rpc/security.h"

namespace moemesh {

struct PlacementWatcherOptions {
  // The controller, H:P.
  std::string controller;
  // Names this router to the controller; random when empty.
  std::string router_id;
  // How often the load windows go to the controller.
  std::chrono::milliseconds report_interval{2000};
  // The credentials it dials the controller with; null: plaintext.
  std::shared_ptr<Security> security;

  absl::Status Validate() const;
};

class PlacementWatcher {
 public:
  // `router` is not owned and must outlive the watcher.
  static absl::StatusOr<std::unique_ptr<PlacementWatcher>> Start(PlacementWatcherOptions options,
                                                                 MoeRouter* router);
  // Closes the stream and stops both threads.
  ~PlacementWatcher();
  PlacementWatcher(const PlacementWatcher&) = delete;
  PlacementWatcher& operator=(const PlacementWatcher&) = delete;

  // Whether the watch stream is open now.
  bool connected() const { return connected_.load(); }
  const std::string& router_id() const { return options_.router_id; }

 private:
  PlacementWatcher(PlacementWatcherOptions options, MoeRouter* router);
  void WatchLoop();
  // One stream, from connect to its end.
  void WatchOnce();
  // Applies one published placement and acknowledges what the router then serves.
  void Apply(const v1::Placement& placement);
  void ReportLoop();
  // Sleeps `d` unless stopped meanwhile; false when stopped.
  bool SleepFor(std::chrono::milliseconds d);
  bool Stopped() const ABSL_SHARED_LOCKS_REQUIRED(mu_) { return stop_; }

  PlacementWatcherOptions options_;
  MoeRouter* const router_;
  std::unique_ptr<v1::PlacementController::Stub> stub_;
  std::atomic<bool> connected_{false};
  Mutex mu_;
  bool stop_ ABSL_GUARDED_BY(mu_) = false;
  grpc::ClientContext* stream_ ABSL_GUARDED_BY(mu_) = nullptr;  // the open stream's, to cancel
  std::thread watcher_, reporter_;
};

}  // namespace moemesh
