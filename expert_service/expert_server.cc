#include "expert_service/expert_server.h"

#include <grpcpp/ext/proto_server_reflection_plugin.h>
#include <grpcpp/health_check_service_interface.h>

#include <set>

#include "absl/strings/str_cat.h"
#include "kernels/cpu/expert_ffn.h"
#include "services/status_macros.h"
#include "services/wire.h"

namespace moemesh {

absl::Status ExpertServerOptions::Validate() const {
  if (model_dir.empty()) return absl::InvalidArgumentError("model_dir is required");
  if (listen.empty()) return absl::InvalidArgumentError("listen address is required");
  if (max_message_bytes <= 0) return absl::InvalidArgumentError("max_message_bytes must be positive");
  return absl::OkStatus();
}

absl::Status ExpertServer::Compute(const v1::ComputeRequest& req, v1::ComputeResponse* resp) {
  const auto start = std::chrono::steady_clock::now();
  const int64_t layer = req.layer(), H = config_.hidden_size;
  RETURN_IF_ERROR(config_.CheckMoeLayer(layer));
  auto out_dtype = FromProtoDType(req.output_dtype());
  if (!out_dtype.ok() || (*out_dtype != DType::kF32 && *out_dtype != DType::kBF16)) {
    return absl::InvalidArgumentError("output_dtype must be F32 or BF16");
  }
  // Validate everything before computing anything.
  struct Batch {
    int32_t expert;
    std::shared_ptr<const ExpertWeights> weights;
    ExpertFfnWeights view;
    Tensor x;  // F32 [n, H]
    int64_t rows;
    size_t gu_off, h_off;
  };
  std::vector<Batch> batches;
  std::set<int32_t> seen;
  size_t gu_floats = 0, h_floats = 0;
  for (int i = 0; i < req.batches_size(); ++i) {
    const auto& b = req.batches(i);
    const std::string what = absl::StrCat("layer ", layer, " expert ", b.expert());
    if (!seen.insert(b.expert()).second) {
      return absl::InvalidArgumentError(absl::StrCat(what, " appears twice in one request"));
    }
    ASSIGN_OR_RETURN(auto weights, store_->Get(layer, b.expert()));
    ASSIGN_OR_RETURN(Tensor rows, FromProto(b.rows(), nullptr, what));
    if (rows.rank() != 2 || rows.dim(1) != H) {
      return absl::InvalidArgumentError(absl::StrCat(what, ": rows have shape ", ShapeString(rows.shape()),
                                                     ", expected [n, ", H, "]"));
    }
    if (rows.dtype() != DType::kF32 && rows.dtype() != DType::kBF16) {
      return absl::InvalidArgumentError(absl::StrCat(what, ": rows have dtype ", DTypeName(rows.dtype()),
                                                     ", expected F32 or BF16"));
    }
    ASSIGN_OR_RETURN(Tensor x, rows.ToF32());
    Batch batch{b.expert(), weights, weights->View(config_), std::move(x), rows.dim(0), gu_floats, h_floats};
    gu_floats += GateUpScratch(batch.view, batch.rows);
    h_floats += HiddenScratch(batch.view, batch.rows);
    batches.push_back(std::move(batch));
  }
  // The kernels' canonical tasks over every batch, exactly as MoeLayer runs them.
  std::vector<float> gu(gu_floats), h(h_floats);
  std::vector<Tensor> ys;
  std::vector<std::pair<size_t, int64_t>> tasks;  // (batch, task)
  for (size_t i = 0; i < batches.size(); ++i) {
    ys.push_back(Tensor::Empty(DType::kF32, {batches[i].rows, H}));
    if (batches[i].rows == 0) continue;
    for (int64_t t = 0; t < NumGateUpTasks(batches[i].view); ++t) tasks.push_back({i, t});
  }
  pool_->ParallelFor(static_cast<int64_t>(tasks.size()), [&](int64_t k) {
    const Batch& b = batches[tasks[k].first];
    ExpertGateUpTask(b.view, b.x.data<float>(), b.rows, tasks[k].second, gu.data() + b.gu_off,
                     h.data() + b.h_off);
  });
  tasks.clear();
  for (size_t i = 0; i < batches.size(); ++i) {
    if (batches[i].rows == 0) continue;
    for (int64_t t = 0; t < NumDownTasks(batches[i].view); ++t) tasks.push_back({i, t});
  }
  pool_->ParallelFor(static_cast<int64_t>(tasks.size()), [&](int64_t k) {
    const size_t i = tasks[k].first;
    const Batch& b = batches[i];
    ExpertDownTask(b.view, h.data() + b.h_off, b.rows, tasks[k].second, ys[i].mutable_data<float>());
  });
  for (size_t i = 0; i < batches.size(); ++i) {
    auto* out = resp->add_outputs();
    out->set_expert(batches[i].expert);
    RETURN_IF_ERROR(ToProto(ys[i], *out_dtype, out->mutable_rows()));
  }
  resp->set_compute_micros(std::chrono::duration_cast<std::chrono::microseconds>(
                               std::chrono::steady_clock::now() - start).count());
  return absl::OkStatus();
}

class ExpertServer::Service : public v1::ExpertService::CallbackService {
 public:
  explicit Service(ExpertServer* server) : server_(server) {}

  grpc::ServerUnaryReactor* Compute(grpc::CallbackServerContext* ctx, const v1::ComputeRequest* req,
                                    v1::ComputeResponse* resp) override {
    absl::Status s = server_->Compute(*req, resp);
    if (!s.ok()) resp->Clear();
    return Finish(ctx, s);
  }
  grpc::ServerUnaryReactor* LoadExperts(grpc::CallbackServerContext* ctx,
                                        const v1::LoadExpertsRequest* req,
                                        v1::LoadExpertsResponse* resp) override {
    std::vector<ExpertKey> keys;
    for (const auto& e : req->experts()) keys.push_back({e.layer(), e.expert()});
    absl::Status s = server_->store_->Load(keys);
    resp->set_experts_loaded(static_cast<int64_t>(server_->store_->List().size()));
    resp->set_weight_bytes(server_->store_->weight_bytes());
    return Finish(ctx, s);
  }
  grpc::ServerUnaryReactor* UnloadExperts(grpc::CallbackServerContext* ctx,
                                          const v1::UnloadExpertsRequest* req,
                                          v1::UnloadExpertsResponse* resp) override {
    std::vector<ExpertKey> keys;
    for (const auto& e : req->experts()) keys.push_back({e.layer(), e.expert()});
    server_->store_->Unload(keys);
    resp->set_experts_loaded(static_cast<int64_t>(server_->store_->List().size()));
    resp->set_weight_bytes(server_->store_->weight_bytes());
    return Finish(ctx, absl::OkStatus());
  }
  grpc::ServerUnaryReactor* Info(grpc::CallbackServerContext* ctx, const v1::InfoRequest*,
                                 v1::InfoResponse* resp) override {
    resp->set_model_type(FamilyName(server_->config_.family));
    resp->set_hidden_size(server_->config_.hidden_size);
    resp->set_num_experts(server_->config_.num_experts);
    for (const auto& [layer, expert] : server_->store_->List()) {
      auto* e = resp->add_experts();
      e->set_layer(layer);
      e->set_expert(expert);
    }
    resp->set_weight_bytes(server_->store_->weight_bytes());
    resp->set_service_id(server_->options_.service_id);
    return Finish(ctx, absl::OkStatus());
  }

 private:
  static grpc::ServerUnaryReactor* Finish(grpc::CallbackServerContext* ctx, const absl::Status& s) {
    auto* reactor = ctx->DefaultReactor();
    reactor->Finish(ToGrpcStatus(s));
    return reactor;
  }
  ExpertServer* server_;
};

absl::StatusOr<std::unique_ptr<ExpertServer>> ExpertServer::Create(ExpertServerOptions options) {
  RETURN_IF_ERROR(options.Validate());
  auto s = std::unique_ptr<ExpertServer>(new ExpertServer());
  s->options_ = std::move(options);
  ASSIGN_OR_RETURN(s->ckpt_, Checkpoint::Open(s->options_.model_dir));
  ASSIGN_OR_RETURN(s->config_, ParseMoeModelConfig(s->ckpt_->config()));
  s->store_ = std::make_unique<ExpertStore>(*s->ckpt_, s->config_);
  s->pool_ = s->options_.pool ? s->options_.pool : &ThreadPool::Default();
  SetBlasThreads(1);  // parallelism comes from the pool
  ASSIGN_OR_RETURN(std::vector<ExpertKey> keys, ParseExpertSpec(s->options_.experts, s->config_));
  RETURN_IF_ERROR(s->store_->Load(keys));

  s->service_ = std::make_unique<Service>(s.get());
  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  builder.AddListeningPort(s->options_.listen, grpc::InsecureServerCredentials(), &s->port_);
  builder.SetMaxReceiveMessageSize(s->options_.max_message_bytes);
  builder.SetMaxSendMessageSize(s->options_.max_message_bytes);
  builder.RegisterService(s->service_.get());
  s->server_ = builder.BuildAndStart();
  if (!s->server_ || s->port_ == 0) {
    return absl::UnavailableError(absl::StrCat("cannot listen on ", s->options_.listen));
  }
  // SERVING only now: every assigned expert is loaded.
  s->server_->GetHealthCheckService()->SetServingStatus(true);
  return s;
}

ExpertServer::~ExpertServer() { Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(5)); }

void ExpertServer::Shutdown(std::chrono::system_clock::time_point deadline) {
  if (shut_down_ || !server_) return;
  shut_down_ = true;
  server_->GetHealthCheckService()->SetServingStatus(false);
  server_->Shutdown(deadline);
}

void ExpertServer::Wait() { server_->Wait(); }

}  // namespace moemesh
