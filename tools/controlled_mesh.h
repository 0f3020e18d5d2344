// ControlledMesh: a mesh run by a placement controller, on loopback, as separate
// processes: `moemesh controller`, N `moemesh expert --controller`, R `moemesh router
// --controller`. For the demo's --skew run, the controller end-to-end tests and the
// rebalancing benchmark. Services are added, stopped, killed and restarted while it runs.
#pragma once

#include <chrono>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "controller.grpc.pb.h"
#include "services/rpc/security.h"
#include "tools/process.h"

namespace moemesh {

struct ControlledMeshOptions {
  std::string moemesh_binary;  // path of the moemesh executable
  std::string model_dir;
  int num_expert_services = 3;
  int num_routers = 1;
  int min_replicas = 1;
  int expert_slots = 0;
  double rebalance_interval_s = 0;  // 0: rounds only on request (and for repairs)
  double lease_s = 1.0;
  double load_report_s = 0.5;
  double load_window_s = 5;  // the routers' load window
  std::string wire = "f32";
  int expert_threads = 1;
  bool metrics = false;  // every process serves metrics on a free loopback port
  std::string transport = "grpc";
  int router_port = 0;  // the first router's port on 127.0.0.1; 0: any free one
  std::vector<std::string> controller_flags, expert_flags, router_flags;
  // The credentials the launcher's own calls use (controller, readiness); null: plaintext.
  std::shared_ptr<Security> client_security;
};

class ControlledMesh {
 public:
  // Starts everything and waits until every router is ready (serves a placement whose
  // experts are all loaded).
  static absl::StatusOr<std::unique_ptr<ControlledMesh>> Start(const ControlledMeshOptions& o);
  // Stops the routers, the controller, then the expert services.
  ~ControlledMesh();

  const std::string& controller_endpoint() const { return controller_endpoint_; }
  const std::vector<std::string>& router_endpoints() const { return router_endpoints_; }
  const std::vector<std::string>& expert_endpoints() const { return expert_endpoints_; }
  // With options.metrics: "http://127.0.0.1:PORT/metrics".
  const std::string& controller_metrics_url() const { return controller_metrics_url_; }
  const std::vector<std::string>& router_metrics_urls() const { return router_metrics_urls_; }
  const std::string& expert_metrics_url(int i) const { return expert_metrics_urls_[i]; }
  ChildProcess& controller_process() { return *controller_; }
  ChildProcess& router_process(int i) { return *routers_[i]; }
  ChildProcess& expert_process(int i) { return *experts_[i]; }

  // Starts one more expert service; its index.
  absl::StatusOr<int> AddExpert();
  // Starts the controller again on its port (after it was stopped or killed).
  absl::Status RestartController();
  // Starts expert service i again on its port (and metrics port) with its service id, after
  // it was stopped or killed (one still running is stopped first). The port was free while
  // it was down, so another socket may have taken it: the start is retried for a few seconds.
  absl::Status RestartExpert(int i);

  absl::StatusOr<v1::ControllerState> State();
  absl::StatusOr<v1::RebalanceResponse> Rebalance();
  // Polls the controller's state until `done(state)` or `timeout`.
  absl::Status WaitForState(const std::function<bool(const v1::ControllerState&)>& done,
                            std::chrono::milliseconds timeout);
  // Every router ready (KServe ServerReady).
  absl::Status WaitRoutersReady(std::chrono::milliseconds timeout);

 private:
  ControlledMesh() = default;
  absl::Status StartController(const std::string& listen, const std::string& metrics_listen);
  std::vector<std::string> ExpertArgs(int i, const std::string& listen,
                                      const std::string& metrics_listen) const;

  ControlledMeshOptions options_;
  std::unique_ptr<ChildProcess> controller_;
  std::string controller_endpoint_, controller_metrics_url_;
  std::vector<std::unique_ptr<ChildProcess>> experts_, routers_;
  std::vector<std::string> expert_endpoints_, router_endpoints_, router_metrics_urls_,
      expert_metrics_urls_;
  std::unique_ptr<v1::PlacementController::Stub> stub_;
};

}  // namespace moemesh
