#include "tools/controlled_mesh.h"

#include <grpcpp/grpcpp.h>

#include <thread>

#include "absl/strings/str_cat.h"
#include "services/base/status_macros.h"
#include "services/rpc/wire.h"
#include "tools/local_mesh.h"

namespace moemesh {
namespace {

constexpr auto kStartTimeout = std::chrono::seconds(120);

// Reads "metrics on URL" (when metrics are on), then "listening on HOST:PORT".
absl::Status WaitStarted(bool metrics, ChildProcess& p, std::string* endpoint,
                         std::string* metrics_url) {
  if (metrics) {
    ASSIGN_OR_RETURN(*metrics_url, p.WaitForLine("metrics on ", kStartTimeout));
  }
  ASSIGN_OR_RETURN(*endpoint, p.WaitListening(kStartTimeout));
  return absl::OkStatus();
}

}  // namespace

absl::Status ControlledMesh::StartController(const std::string& listen,
                                             const std::string& metrics_listen) {
  std::vector<std::string> args = {options_.moemesh_binary,
                                   "controller",
                                   "--model",
                                   options_.model_dir,
                                   "--listen",
                                   listen,
                                   "--rebalance-interval-s",
                                   absl::StrCat(options_.rebalance_interval_s),
                                   "--min-replicas",
                                   absl::StrCat(options_.min_replicas),
                                   "--expert-slots",
                                   absl::StrCat(options_.expert_slots),
                                   "--lease-s",
                                   absl::StrCat(options_.lease_s)};
  if (options_.metrics) {
    args.push_back("--metrics-listen");
    args.push_back(metrics_listen);
  }
  args.insert(args.end(), options_.controller_flags.begin(), options_.controller_flags.end());
  ASSIGN_OR_RETURN(controller_, ChildProcess::Start(args));
  std::string metrics_url;
  RETURN_IF_ERROR(WaitStarted(options_.metrics, *controller_, &controller_endpoint_, &metrics_url));
  if (options_.metrics) controller_metrics_url_ = metrics_url;
  return absl::OkStatus();
}

std::vector<std::string> ControlledMesh::ExpertArgs(int i, const std::string& listen,
                                                    const std::string& metrics_listen) const {
  std::vector<std::string> args = {options_.moemesh_binary,
                                   "expert",
                                   "--model",
                                   options_.model_dir,
                                   "--listen",
                                   listen,
                                   "--service-id",
                                   absl::StrCat("expert-", i),
                                   "--controller",
                                   controller_endpoint_,
                                   "--threads",
                                   absl::StrCat(options_.expert_threads),
                                   "--transport",
                                   options_.transport};
  if (options_.metrics) {
    args.push_back("--metrics-listen");
    args.push_back(metrics_listen);
  }
  args.insert(args.end(), options_.expert_flags.begin(), options_.expert_flags.end());
  return args;
}

absl::StatusOr<std::unique_ptr<ControlledMesh>> ControlledMesh::Start(
    const ControlledMeshOptions& o) {
  auto mesh = std::unique_ptr<ControlledMesh>(new ControlledMesh());
  mesh->options_ = o;
  RETURN_IF_ERROR(mesh->StartController("127.0.0.1:0", "127.0.0.1:0"));
  const std::shared_ptr<Security> security =
      o.client_security != nullptr ? o.client_security : Security::Insecure();
  mesh->stub_ = v1::PlacementController::NewStub(security->Dial(mesh->controller_endpoint_));
  for (int i = 0; i < o.num_expert_services; ++i) RETURN_IF_ERROR(mesh->AddExpert().status());
  for (int i = 0; i < o.num_routers; ++i) {
    std::vector<std::string> args = {
        o.moemesh_binary,  "router",
        "--model",         o.model_dir,
        "--controller",    mesh->controller_endpoint_,
        "--router-id",     absl::StrCat("router-", i),
        "--listen",        absl::StrCat("127.0.0.1:", i == 0 ? o.router_port : 0),
        "--wire",          o.wire,
        "--transport",     o.transport,
        "--load-report-s", absl::StrCat(o.load_report_s),
        "--load-window-s", absl::StrCat(o.load_window_s)};
    if (o.metrics) {
      args.push_back("--metrics-listen");
      args.push_back("127.0.0.1:0");
    }
    args.insert(args.end(), o.router_flags.begin(), o.router_flags.end());
    ASSIGN_OR_RETURN(auto p, ChildProcess::Start(args));
    std::string endpoint, metrics_url;
    RETURN_IF_ERROR(WaitStarted(o.metrics, *p, &endpoint, &metrics_url));
    mesh->routers_.push_back(std::move(p));
    mesh->router_endpoints_.push_back(endpoint);
    mesh->router_metrics_urls_.push_back(metrics_url);
  }
  RETURN_IF_ERROR(mesh->WaitRoutersReady(kStartTimeout));
  return mesh;
}

ControlledMesh::~ControlledMesh() {
  routers_.clear();
  controller_.reset();
  experts_.clear();
}

absl::StatusOr<int> ControlledMesh::AddExpert() {
  const int i = static_cast<int>(experts_.size());
  ASSIGN_OR_RETURN(auto p, ChildProcess::Start(ExpertArgs(i, "127.0.0.1:0", "127.0.0.1:0")));
  std::string endpoint, metrics_url;
  RETURN_IF_ERROR(WaitStarted(options_.metrics, *p, &endpoint, &metrics_url));
  experts_.push_back(std::move(p));
  expert_endpoints_.push_back(endpoint);
  expert_metrics_urls_.push_back(metrics_url);
  return i;
}

absl::Status ControlledMesh::RestartController() {
  controller_.reset();
  const std::string metrics_listen =
      options_.metrics ? MetricsTarget(controller_metrics_url_) : "127.0.0.1:0";
  return StartController(controller_endpoint_, metrics_listen);
}

absl::Status ControlledMesh::RestartExpert(int i) {
  if (i < 0 || i >= static_cast<int>(experts_.size())) {
    return absl::OutOfRangeError(absl::StrCat("no expert service ", i));
  }
  experts_[i].reset();
  const std::string metrics_listen =
      options_.metrics ? MetricsTarget(expert_metrics_urls_[i]) : "127.0.0.1:0";
  const auto end = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  absl::Status last;
  do {
    ASSIGN_OR_RETURN(auto p,
                     ChildProcess::Start(ExpertArgs(i, expert_endpoints_[i], metrics_listen)));
    std::string endpoint, metrics_url;
    last = WaitStarted(options_.metrics, *p, &endpoint, &metrics_url);
    if (last.ok() && endpoint != expert_endpoints_[i]) {
      return absl::InternalError(absl::StrCat("expert service ", i, " restarted on ", endpoint,
                                              ", not on ", expert_endpoints_[i]));
    }
    if (last.ok()) {
      experts_[i] = std::move(p);
      if (options_.metrics) expert_metrics_urls_[i] = metrics_url;
      return absl::OkStatus();
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
  } while (std::chrono::steady_clock::now() < end);
  return last;
}

absl::StatusOr<v1::ControllerState> ControlledMesh::State() {
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
  v1::ControllerState s;
  RETURN_IF_ERROR(FromGrpcStatus(stub_->GetState(&ctx, v1::GetStateRequest(), &s)));
  return s;
}

absl::StatusOr<v1::RebalanceResponse> ControlledMesh::Rebalance() {
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(120));
  v1::RebalanceResponse r;
  RETURN_IF_ERROR(FromGrpcStatus(stub_->Rebalance(&ctx, v1::RebalanceRequest(), &r)));
  return r;
}

absl::Status ControlledMesh::WaitForState(
    const std::function<bool(const v1::ControllerState&)>& done,
    std::chrono::milliseconds timeout) {
  const auto end = std::chrono::steady_clock::now() + timeout;
  absl::Status last = absl::DeadlineExceededError("the controller never reached the state");
  while (std::chrono::steady_clock::now() < end) {
    absl::StatusOr<v1::ControllerState> s = State();
    if (s.ok() && done(*s)) return absl::OkStatus();
    if (!s.ok()) last = s.status();
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  return last;
}

absl::Status ControlledMesh::WaitRoutersReady(std::chrono::milliseconds timeout) {
  const auto end = std::chrono::steady_clock::now() + timeout;
  for (const std::string& endpoint : router_endpoints_) {
    KServeClient client(endpoint, 256 << 20, options_.client_security);
    while (true) {
      absl::StatusOr<bool> ready = client.ServerReady();
      if (ready.ok() && *ready) break;
      if (std::chrono::steady_clock::now() >= end) {
        return absl::DeadlineExceededError(absl::StrCat("router ", endpoint, " never ready"));
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
  }
  return absl::OkStatus();
}

}  // namespace moemesh
