#include "expert_service/controller_agent.h"

#include <grpcpp/grpcpp.h>

#include <algorithm>
#include <cstdio>

#include "absl/strings/str_cat.h"
#include "services/base/status_macros.h"
#include "services/rpc/wire.h"

namespace moemesh {

absl::Status ControllerAgentOptions::Validate() const {
  if (controller.empty()) return absl::InvalidArgumentError("controller is required");
  if (endpoint.empty()) return absl::InvalidArgumentError("endpoint is required");
  return absl::OkStatus();
}

ControllerAgent::ControllerAgent(ControllerAgentOptions options, ExpertServer* server)
    : options_(std::move(options)), server_(server) {}

absl::StatusOr<std::unique_ptr<ControllerAgent>> ControllerAgent::Start(
    ControllerAgentOptions options, ExpertServer* server) {
  RETURN_IF_ERROR(options.Validate());
  auto a = std::unique_ptr<ControllerAgent>(new ControllerAgent(std::move(options), server));
  grpc::ChannelArguments args;
  args.SetInt(GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS, 100);
  args.SetInt(GRPC_ARG_MAX_RECONNECT_BACKOFF_MS, 1000);
  if (a->options_.security == nullptr) a->options_.security = Security::Insecure();
  a->stub_ =
      v1::PlacementController::NewStub(a->options_.security->Dial(a->options_.controller, args));
  a->thread_ = std::thread([raw = a.get()] { raw->Loop(); });
  return a;
}

ControllerAgent::~ControllerAgent() {
  {
    MutexLock lock(&mu_);
    stop_ = true;
  }
  thread_.join();
}

bool ControllerAgent::SleepFor(std::chrono::milliseconds d) {
  MutexLock lock(&mu_);
  return !mu_.AwaitWithTimeout(&stop_, d);
}

absl::Status ControllerAgent::Register() {
  const ExpertStore& store = server_->store();
  v1::RegisterRequest req;
  req.set_endpoint(options_.endpoint);
  req.set_service_id(options_.service_id);
  for (const auto& [layer, expert] : store.List()) {
    v1::ExpertId* id = req.add_experts();
    id->set_layer(layer);
    id->set_expert(expert);
  }
  req.set_expert_bytes(ExpertBytes(store.config()));
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
  v1::RegisterResponse resp;
  RETURN_IF_ERROR(FromGrpcStatus(stub_->Register(&ctx, req, &resp)));
  lease_ms_ = resp.lease_ms();
  std::fprintf(stderr, "expert service %s: registered with the controller at %s (lease %lld ms)\n",
               options_.service_id.c_str(), options_.controller.c_str(),
               static_cast<long long>(resp.lease_ms()));
  return absl::OkStatus();
}

void ControllerAgent::Loop() {
  auto backoff = std::chrono::milliseconds(100);
  while (true) {
    {
      MutexLock lock(&mu_);
      if (stop_) return;
    }
    if (!registered_) {
      if (Register().ok()) {
        registered_ = true;
        backoff = std::chrono::milliseconds(100);
      } else {
        if (!SleepFor(backoff)) return;
        backoff = std::min<std::chrono::milliseconds>(backoff * 2, std::chrono::seconds(1));
        continue;
      }
    }
    if (!SleepFor(std::chrono::milliseconds(std::max<int64_t>(lease_ms_ / 3, 50)))) return;
    v1::HeartbeatRequest req;
    req.set_endpoint(options_.endpoint);
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() +
                     std::chrono::milliseconds(std::max<int64_t>(lease_ms_ / 3, 100)));
    v1::HeartbeatResponse resp;
    const grpc::Status s = stub_->Heartbeat(&ctx, req, &resp);
    // Forgotten (a restarted controller, an expired lease): register again at once.
    if (s.error_code() == grpc::StatusCode::NOT_FOUND) registered_ = false;
  }
}

absl::Status ControllerAgent::Leave(std::chrono::system_clock::time_point deadline) {
  v1::LeaveRequest req;
  req.set_endpoint(options_.endpoint);
  grpc::ClientContext ctx;
  ctx.set_deadline(deadline);
  v1::LeaveResponse resp;
  const absl::Status s = FromGrpcStatus(stub_->Leave(&ctx, req, &resp));
  if (s.ok()) {
    std::fprintf(stderr, "expert service %s: the controller moved its experts away (epoch %llu)\n",
                 options_.service_id.c_str(), static_cast<unsigned long long>(resp.epoch()));
  }
  return s;
}

}  // namespace moemesh
