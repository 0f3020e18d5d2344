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
    ConcurrencyLimit::Slot slot(*server_->inferring_);
    if (metrics == nullptr) return ToGrpcStatus(Infer(ctx, *req, resp));
    metrics->inflight().Increment();
    const absl::Status status = Infer(ctx, *req, resp);
    metrics->inflight().Decrement();
    metrics->CountRequest(status.code());
    return ToGrpcStatus(status);
  }

 private:
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
  server_->Shutdown(deadline);
}

void RouterServer::Wait() { server_->Wait(); }

}  // namespace moemesh
