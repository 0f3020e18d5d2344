#include "router_service/router_server.h"

#include <grpcpp/health_check_service_interface.h>

#include <algorithm>
#include <cstring>
#include <string>

#include "absl/strings/str_cat.h"
#include "grpc_predict_v2.grpc.pb.h"
#include "router_control.grpc.pb.h"
#include "router_service/kserve_request.h"
#include "services/base/status_macros.h"
#include "services/rpc/grpc_server.h"
#include "services/rpc/wire.h"

namespace moemesh {

using inference::ModelInferRequest;
using inference::ModelInferResponse;

absl::Status RouterServerOptions::Validate() const {
  if (listen.empty()) return absl::InvalidArgumentError("listen address is required");
  if (model_name.empty()) return absl::InvalidArgumentError("model_name is required");
  if (max_message_bytes <= 0)
    return absl::InvalidArgumentError("max_message_bytes must be positive");
  if (max_concurrent_infers <= 0) {
    return absl::InvalidArgumentError("max_concurrent_infers must be positive");
  }
  if (max_inflight_tokens < 0) {
    return absl::InvalidArgumentError("max_inflight_tokens must be >= 0");
  }
  return absl::OkStatus();
}

class RouterServer::InferenceService : public inference::GRPCInferenceService::Service {
 public:
  explicit InferenceService(RouterServer* server) : server_(server) {}

  grpc::Status ServerLive(grpc::ServerContext*, const inference::ServerLiveRequest*,
                          inference::ServerLiveResponse* resp) override {
    resp->set_live(true);
    return grpc::Status::OK;
  }
  grpc::Status ServerReady(grpc::ServerContext*, const inference::ServerReadyRequest*,
                           inference::ServerReadyResponse* resp) override {
    resp->set_ready(server_->ready());
    return grpc::Status::OK;
  }
  grpc::Status ModelReady(grpc::ServerContext*, const inference::ModelReadyRequest* req,
                          inference::ModelReadyResponse* resp) override {
    const absl::Status known =
        CheckModel(req->name(), req->version(), server_->options_.model_name);
    if (!known.ok()) return ToGrpcStatus(known);
    resp->set_ready(server_->ready());
    return grpc::Status::OK;
  }
  grpc::Status ServerMetadata(grpc::ServerContext*, const inference::ServerMetadataRequest*,
                              inference::ServerMetadataResponse* resp) override {
    resp->set_name("moemesh");
    resp->set_version("0.1.0");
    return grpc::Status::OK;
  }
  grpc::Status ModelMetadata(grpc::ServerContext* ctx, const inference::ModelMetadataRequest* req,
                             inference::ModelMetadataResponse* resp) override {
    if (grpc::Status s = server_->options_.security->Authorize(*ctx, Access::kApi); !s.ok()) {
      return s;
    }
    const absl::Status known =
        CheckModel(req->name(), req->version(), server_->options_.model_name);
    if (!known.ok()) return ToGrpcStatus(known);
    const MoeModelConfig& c = server_->router_->config();
    resp->set_name(server_->options_.model_name);
    resp->add_versions(std::string(kModelVersion));  // (a const char* trips GCC 12's -Wrestrict)
    resp->set_platform(absl::StrCat("moemesh_", FamilyName(c.family)));
    auto add = [](auto* list, const char* name, const char* dtype, std::vector<int64_t> shape) {
      auto* t = list->Add();
      t->set_name(name);
      t->set_datatype(dtype);
      for (int64_t d : shape) t->add_shape(d);
    };
    add(resp->mutable_inputs(), "hidden_states", "FP32", {-1, c.hidden_size});
    add(resp->mutable_inputs(), "layer", "INT64", {1});
    add(resp->mutable_outputs(), "output", "FP32", {-1, c.hidden_size});
    add(resp->mutable_outputs(), "topk_ids", "INT32", {-1, c.top_k});
    add(resp->mutable_outputs(), "topk_weights", "FP32", {-1, c.top_k});
    return grpc::Status::OK;
  }
  grpc::Status ModelInfer(grpc::ServerContext* ctx, const ModelInferRequest* req,
                          ModelInferResponse* resp) override {
    // Runs on the gRPC thread that received the call: Forward waits for its expert
    // calls on a completion queue of its own, so blocking here starves nothing.
    RouterMetrics* metrics = server_->router_->metrics();
    if (grpc::Status s = server_->options_.security->Authorize(*ctx, Access::kApi); !s.ok()) {
      if (metrics != nullptr) metrics->CountRequest(static_cast<absl::StatusCode>(s.error_code()));
      return s;
    }
    // Refused with UNAVAILABLE once draining: the client retries on another router.
    absl::StatusOr<DrainGate::Admission> admitted = server_->drain_.Admit();
    if (!admitted.ok()) {
      if (metrics != nullptr) metrics->CountRequest(admitted.status().code());
      return ToGrpcStatus(admitted.status());
    }
    // Admission control: over the token bound, refused at once.
    const int64_t tokens = RequestTokens(*req);
    const int64_t limit = server_->options_.max_inflight_tokens;
    const int64_t before = server_->inflight_tokens_.fetch_add(tokens);
    struct Release {
      std::atomic<int64_t>& inflight;
      int64_t tokens;
      ~Release() { inflight.fetch_sub(tokens); }
    } release{server_->inflight_tokens_, tokens};
    if (limit > 0 && before > 0 && before + tokens > limit) {
      return Shed(metrics, "inflight",
                  absl::ResourceExhaustedError(absl::StrCat(
                      "the router is at capacity: ", before, " tokens in flight, ", tokens,
                      " more would pass --max-inflight-tokens ", limit, "; retry later")));
    }
    // Waits for a forwarding slot only as long as the deadline leaves time for the call.
    const auto expected = std::chrono::duration_cast<std::chrono::system_clock::duration>(
        std::chrono::duration<double>(server_->call_seconds_.load()));
    // (A call without a deadline waits as long as it takes; far-future time points are kept
    // out of the timed wait, whose clock conversion would overflow.)
    const auto now = std::chrono::system_clock::now();
    const auto wait_until = ctx->deadline() - now > std::chrono::hours(24)
                                ? now + std::chrono::hours(24)
                                : ctx->deadline() - expected;
    ConcurrencyLimit::Slot slot(*server_->inferring_, wait_until);
    if (!slot.acquired()) {
      return Shed(metrics, "deadline",
                  absl::DeadlineExceededError(
                      "queued at the router until its deadline could no longer be met"));
    }
    const auto start = std::chrono::steady_clock::now();
    if (metrics != nullptr) metrics->inflight().Increment();
    const absl::Status status = Infer(ctx, *req, resp);
    if (metrics != nullptr) {
      metrics->inflight().Decrement();
      metrics->CountRequest(status.code());
    }
    if (status.ok()) {
      // A moving average over the last ~20 calls.
      const double took =
          std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
      const double avg = server_->call_seconds_.load();
      server_->call_seconds_.store(avg == 0 ? took : avg + (took - avg) / 20);
    }
    return ToGrpcStatus(status);
  }

 private:
  // The rows of the call's hidden_states (0 when it does not say: parsing refuses it later).
  static int64_t RequestTokens(const ModelInferRequest& req) {
    for (const auto& input : req.inputs()) {
      if (input.name() == "hidden_states" && input.shape_size() > 0 && input.shape(0) > 0) {
        return std::min<int64_t>(input.shape(0), int64_t{1} << 40);
      }
    }
    return 0;
  }

  static grpc::Status Shed(RouterMetrics* metrics, const char* reason, const absl::Status& why) {
    if (metrics != nullptr) {
      metrics->CountShed(reason);
      metrics->CountRequest(why.code());
    }
    return ToGrpcStatus(why);
  }

  // Parse, run, write.
  absl::Status Infer(grpc::ServerContext* ctx, const ModelInferRequest& req,
                     ModelInferResponse* resp) {
    RETURN_IF_ERROR(
        CheckModel(req.model_name(), req.model_version(), server_->options_.model_name));
    MoeRouter& router = *server_->router_;
    ASSIGN_OR_RETURN(const InferCall call, ParseInfer(req, router.config()));
    // The caller's deadline bounds every outgoing call, capped by the router's own.
    const auto deadline = std::min(
        ctx->deadline(), std::chrono::system_clock::now() + router.options().default_timeout);
    ASSIGN_OR_RETURN(const MoeLayerOutput out, router.Forward(call.layer, call.hidden, deadline));
    WriteInfer(req, call, out, server_->options_.model_name, resp);
    return absl::OkStatus();
  }

  RouterServer* server_;
};

class RouterServer::ControlService : public v1::RouterControl::Service {
 public:
  explicit ControlService(RouterServer* server) : server_(server) {}

  grpc::Status GetPlacement(grpc::ServerContext* ctx, const v1::GetPlacementRequest*,
                            v1::Placement* resp) override {
    if (grpc::Status s = Authorize(*ctx); !s.ok()) return s;
    *resp = server_->router_->placement()->ToProto();
    return grpc::Status::OK;
  }
  grpc::Status SetPlacement(grpc::ServerContext* ctx, const v1::Placement* req,
                            v1::SetPlacementResponse* resp) override {
    if (grpc::Status s = Authorize(*ctx); !s.ok()) return s;
    absl::Status s = [&]() -> absl::Status {
      if (server_->router_->options().placement_from_controller) {
        return absl::FailedPreconditionError(
            "the placement is the controller's: use `moemesh placement` against it");
      }
      ASSIGN_OR_RETURN(PlacementTable t,
                       PlacementTable::FromProto(*req, server_->router_->config()));
      // Checked against the replicas it names: the caller's deadline, at most 10 s.
      return server_->router_->SetPlacement(
          std::move(t),
          std::min(ctx->deadline(), std::chrono::system_clock::now() + std::chrono::seconds(10)));
    }();
    resp->set_epoch(server_->router_->placement()->epoch());
    return ToGrpcStatus(s);
  }
  grpc::Status GetExpertLoad(grpc::ServerContext* ctx, const v1::GetExpertLoadRequest* req,
                             v1::ExpertLoad* resp) override {
    if (grpc::Status s = Authorize(*ctx); !s.ok()) return s;
    const MoeModelConfig& c = server_->router_->config();
    server_->router_->FillExpertLoad(req->layer(), resp);
    if (req->layer() >= 0 && resp->layers_size() == 0) {
      return ToGrpcStatus(c.CheckMoeLayer(req->layer()));
    }
    return grpc::Status::OK;
  }

 private:
  // The control calls need the admin identity.
  grpc::Status Authorize(const grpc::ServerContext& ctx) const {
    return server_->options_.security->Authorize(ctx, Access::kAdmin);
  }

  RouterServer* server_;
};

absl::StatusOr<std::unique_ptr<RouterServer>> RouterServer::Create(
    RouterServerOptions options, std::unique_ptr<MoeRouter> router) {
  RETURN_IF_ERROR(options.Validate());
  auto s = std::unique_ptr<RouterServer>(new RouterServer());
  s->options_ = std::move(options);
  if (s->options_.security == nullptr) s->options_.security = Security::Insecure();
  s->router_ = std::move(router);
  s->inference_ = std::make_unique<InferenceService>(s.get());
  s->control_ = std::make_unique<ControlService>(s.get());
  s->inferring_ = std::make_unique<ConcurrencyLimit>(s->options_.max_concurrent_infers);
  ASSIGN_OR_RETURN(
      StartedServer started,
      StartGrpcServer({s->options_.listen, s->options_.max_message_bytes, s->options_.security},
                      {s->inference_.get(), s->control_.get()}));
  s->server_ = std::move(started.server);
  s->port_ = started.port;
  s->health_thread_ = std::thread([raw = s.get()] { raw->HealthLoop(); });
  return s;
}

RouterServer::~RouterServer() {
  if (server_ != nullptr) {  // null when Create failed to listen
    Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(5));
    if (health_thread_.joinable()) health_thread_.join();
    server_->Wait();
  }
}

void RouterServer::HealthLoop() {
  mu_.Lock();
  while (!stopping_) {
    mu_.Unlock();
    const bool ok =
        router_->CheckReady(std::chrono::system_clock::now() + options_.health_interval).ok();
    mu_.Lock();
    if (stopping_) break;
    ready_ = ok;
    server_->GetHealthCheckService()->SetServingStatus(ok);
    mu_.AwaitWithTimeout(&stopping_, options_.health_interval);
  }
  mu_.Unlock();
}

void RouterServer::Shutdown(std::chrono::system_clock::time_point deadline) {
  {
    MutexLock lock(&mu_);
    if (stopping_) return;
    stopping_ = true;
    ready_ = false;
    server_->GetHealthCheckService()->SetServingStatus(false);
  }
  // New calls are refused (UNAVAILABLE) while the ones in flight finish; only then does the
  // server stop accepting.
  drain_.Drain(deadline);
  server_->Shutdown(DrainGate::ShutdownDeadline(deadline));
}

void RouterServer::Wait() { server_->Wait(); }

}  // namespace moemesh
