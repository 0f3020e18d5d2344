// LocalMesh: a whole mesh on loopback as separate processes — N expert services and a
// router, each a `moemesh` subcommand — for the demo and the end-to-end tests. The
// placement is built first over placeholder names, each expert service is started
// with the experts it gives it, and the router gets the table with the real ports.
#pragma once

#include <chrono>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "grpc_predict_v2.grpc.pb.h"
#include "router_control.grpc.pb.h"
#include "services/base/tensor.h"
#include "services/mesh/placement.h"
#include "services/rpc/security.h"
#include "tools/process.h"

namespace moemesh {

struct LocalMeshOptions {
  std::string moemesh_binary;  // path of the moemesh executable
  std::string model_dir;
  int num_expert_services = 3;
  int replicas = 1;
  PlacementPolicy policy = PlacementPolicy::kContiguous;
  std::string wire = "f32";
  int router_port = 0;  // 0: any free port
  int expert_threads = 1;
  std::string work_dir;  // where the placement file goes
  // The host name the placement gives the router for each expert service: an address,
  // or a name the resolver looks up ("localhost", as a Kubernetes service name would be).
  std::string endpoint_host = "127.0.0.1";
  // More `moemesh router` flags (e.g. {"--timeout-ms", "500"}).
  std::vector<std::string> router_flags;
  // More `moemesh expert` flags, for every expert service.
  std::vector<std::string> expert_flags;
  // Every service serves Prometheus metrics on a free loopback port (metrics_urls()).
  bool metrics = false;
  // The data plane between router and expert services: "grpc" or "ucx".
  std::string transport = "grpc";
  // The credentials the launcher's own calls use (readiness); null: plaintext. The
  // services' own security flags go in router_flags / expert_flags.
  std::shared_ptr<Security> client_security;
};

class LocalMesh {
 public:
  static absl::StatusOr<std::unique_ptr<LocalMesh>> Start(const LocalMeshOptions& options);
  // Stops the services (SIGTERM) and removes the placement file.
  ~LocalMesh();

  const std::string& router_endpoint() const { return router_endpoint_; }
  const std::vector<std::string>& expert_endpoints() const { return expert_endpoints_; }
  const PlacementTable& placement() const { return placement_; }
  // With options.metrics: "http://127.0.0.1:PORT/metrics" of the router, and of each
  // expert service (a restarted one keeps its port).
  const std::string& router_metrics_url() const { return router_metrics_url_; }
  const std::vector<std::string>& expert_metrics_urls() const { return expert_metrics_urls_; }
  ChildProcess& expert_process(int i) { return *experts_[i]; }
  ChildProcess& router_process() { return *router_; }
  // Starts expert service i again on its old port (after it was stopped).
  absl::Status RestartExpert(int i);
  // Waits until the router reports ready (every expert reachable).
  absl::Status WaitReady(std::chrono::milliseconds timeout);

 private:
  LocalMesh() = default;
  std::vector<std::string> ExpertArgs(int i, const std::string& listen,
                                      const std::string& metrics_listen) const;
  // Reads the "metrics on URL" line (with options_.metrics), then "listening on".
  static absl::Status WaitStarted(const LocalMeshOptions& options, ChildProcess& p,
                                  std::string* endpoint, std::string* metrics_url);

  LocalMeshOptions options_;
  PlacementTable placement_;
  std::vector<std::string> specs_;  // per expert service: its --experts value
  std::vector<std::unique_ptr<ChildProcess>> experts_;
  std::vector<std::string> expert_endpoints_;
  std::unique_ptr<ChildProcess> router_;
  std::string router_endpoint_;
  std::string placement_file_;
  std::string router_metrics_url_;
  std::vector<std::string> expert_metrics_urls_;
};

// "http://HOST:PORT/metrics" (a service's printed metrics URL) → "HOST:PORT", as a
// Prometheus target or a --metrics-listen value.
std::string MetricsTarget(const std::string& url);

// A KServe v2 client for the router's ModelInfer.
class KServeClient {
 public:
  // `security`: TLS and the token the client sends; null: plaintext.
  explicit KServeClient(const std::string& endpoint, int max_message_bytes = 256 << 20,
                        const std::shared_ptr<Security>& security = nullptr);
  struct Result {
    Tensor output, topk_ids, topk_weights;
  };
  // hidden_states in its dtype; layer < 0 leaves the input out.
  absl::StatusOr<Result> Infer(const Tensor& hidden_states, int64_t layer,
                               std::chrono::milliseconds timeout, bool want_topk = true);
  absl::StatusOr<bool> ServerReady();
  absl::StatusOr<v1::ExpertLoad> ExpertLoad();
  absl::StatusOr<v1::Placement> Placement();
  inference::GRPCInferenceService::Stub& stub() { return *stub_; }

 private:
  std::unique_ptr<inference::GRPCInferenceService::Stub> stub_;
  std::unique_ptr<v1::RouterControl::Stub> control_;
};

}  // namespace moemesh
