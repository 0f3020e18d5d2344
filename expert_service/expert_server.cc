#include "expert_service/expert_server.h"

#include <grpcpp/health_check_service_interface.h>

#include <algorithm>
#include <map>
#include <thread>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "kernels/cpu/expert_ffn.h"
#include "services/base/scratch.h"
#include "services/base/status_macros.h"
#include "services/rpc/grpc_server.h"
#include "services/rpc/wire.h"
#include "services/runtime/concurrency_limit.h"

namespace moemesh {

// The service's metrics (docs/metrics.md); lock-free updates, except the first rows of
// each expert.
struct ExpertServer::Metrics {
  std::unique_ptr<metrics::StatusCodeCounters> requests;
  metrics::Histogram* latency = nullptr;
  metrics::Histogram* batch_tokens = nullptr;
  metrics::Family<metrics::Counter>* tokens_family = nullptr;
  ExpertSeriesSelection selection;
  // Per exported layer (one shared array when summed): each expert's counter, created
  // on its first rows, so only held experts have series. Immutable map after setup; the
  // slots are atomics, so counting takes no lock.
  using Slots = std::unique_ptr<std::atomic<metrics::Counter*>[]>;
  std::map<int64_t, Slots> owned;
  std::map<int64_t, std::atomic<metrics::Counter*>*> tokens;

  void Setup(const MoeModelConfig& config) {
    for (int64_t layer : config.MoeLayers()) {
      if (!selection.LayerLabel(layer)) continue;
      const int64_t key = selection.summed() ? -1 : layer;
      Slots& slots = owned[key];
      if (!slots) {
        slots = std::make_unique<std::atomic<metrics::Counter*>[]>(config.num_experts);
        for (int64_t e = 0; e < config.num_experts; ++e) slots[e] = nullptr;
      }
      tokens[layer] = slots.get();
    }
  }

  void CountRows(int64_t layer, int32_t expert, int64_t rows) {
    const auto it = tokens.find(layer);
    if (it == tokens.end() || rows <= 0) return;
    std::atomic<metrics::Counter*>& slot = it->second[expert];
    metrics::Counter* counter = slot.load(std::memory_order_acquire);
    if (counter == nullptr) {  // Family::Add returns the same counter to racing callers
      counter = &tokens_family->Add(
          {{"layer", *selection.LayerLabel(layer)}, {"expert", absl::StrCat(expert)}});
      slot.store(counter, std::memory_order_release);
    }
    counter->Increment(static_cast<double>(rows));
  }
};

ExpertServer::ExpertServer() = default;

absl::Status ExpertServer::RegisterMetrics() {
  metrics::Registry& registry = *options_.registry;
  auto m = std::make_unique<Metrics>();
  ASSIGN_OR_RETURN(m->selection,
                   ExpertSeriesSelection::Parse(options_.expert_metrics, store_->config()));
  m->Setup(store_->config());
  ASSIGN_OR_RETURN(auto* requests,
                   metrics::AddCounter(registry, "moemesh_expert_requests_total",
                                       "Compute calls answered, by gRPC status code."));
  m->requests = std::make_unique<metrics::StatusCodeCounters>(*requests);
  ASSIGN_OR_RETURN(
      auto* latency,
      metrics::AddHistogram(registry, "moemesh_expert_compute_latency_seconds",
                            "One Compute call, received to answered.", metrics::LatencyBuckets()));
  m->latency = &latency->Add();
  std::vector<double> rows;
  for (double b = 1; b <= 65536; b *= 2) rows.push_back(b);
  ASSIGN_OR_RETURN(auto* batch, metrics::AddHistogram(registry, "moemesh_expert_batch_tokens",
                                                      "Token rows in one Compute call.", rows));
  m->batch_tokens = &batch->Add();
  ASSIGN_OR_RETURN(m->tokens_family,
                   metrics::AddCounter(registry, "moemesh_expert_tokens_total",
                                       "Token rows computed per expert (layer=\"all\": summed "
                                       "over layers)."));
  RETURN_IF_ERROR(metrics::AddComputedGauge(
      registry, "moemesh_expert_inflight_requests", "Compute calls accepted and not answered.",
      [this](std::vector<metrics::Sample>* out) {
        out->push_back({"", {}, static_cast<double>(drain_.in_flight())});
      }));
  RETURN_IF_ERROR(metrics::AddComputedGauge(
      registry, "moemesh_expert_experts_loaded", "(layer, expert) pairs held.",
      [this](std::vector<metrics::Sample>* out) {
        out->push_back({"", {}, static_cast<double>(store_->size())});
      }));
  RETURN_IF_ERROR(metrics::AddComputedGauge(
      registry, "moemesh_expert_weight_bytes", "Bytes of expert weights held.",
      [this](std::vector<metrics::Sample>* out) {
        out->push_back({"", {}, static_cast<double>(store_->weight_bytes())});
      }));
  if (gpu_ != nullptr) {
    // --device cuda: per GPU, read from GpuExperts at each scrape.
    struct PerGpu {
      const char* name;
      const char* help;
      int64_t GpuDeviceMemory::*field;
    };
    for (const PerGpu& g :
         {PerGpu{"moemesh_expert_gpu_experts", "(layer, expert) pairs resident on each GPU.",
                 &GpuDeviceMemory::experts},
          PerGpu{"moemesh_expert_gpu_weight_bytes", "Expert weight bytes (BF16) on each GPU.",
                 &GpuDeviceMemory::weight_bytes},
          PerGpu{"moemesh_expert_gpu_free_bytes", "Free device memory of each GPU.",
                 &GpuDeviceMemory::device_free_bytes}}) {
      RETURN_IF_ERROR(metrics::AddComputedGauge(
          registry, g.name, g.help, [this, field = g.field](std::vector<metrics::Sample>* out) {
            for (const GpuDeviceMemory& m : gpu_->Memory()) {
              out->push_back(
                  {"", {{"gpu", std::to_string(m.device)}}, static_cast<double>(m.*field)});
            }
          }));
    }
    RETURN_IF_ERROR(
        metrics::AddComputedGauge(registry, "moemesh_expert_gpu_local_moves",
                                  "Experts moved between the service's GPUs so far.",
                                  [this](std::vector<metrics::Sample>* out) {
                                    out->push_back({"", {}, static_cast<double>(gpu_->moves())});
                                  }));
  }
  ASSIGN_OR_RETURN(auto* info, metrics::AddGauge(registry, "moemesh_expert_service_info",
                                                 "The service's id; the value is 1."));
  info->Add({{"service_id", options_.service_id}}).Set(1);
  metrics_ = std::move(m);
  return absl::OkStatus();
}

absl::Status ExpertServerOptions::Validate() const {
  if (model_dir.empty()) return absl::InvalidArgumentError("model_dir is required");
  RETURN_IF_ERROR(ValidateGrpcServerOptions({listen, max_message_bytes}));
  if (service_id.empty()) return absl::InvalidArgumentError("service_id is required");
  if (compute_threads <= 0) return absl::InvalidArgumentError("compute_threads must be positive");
  if (fault_delay.count() < 0) return absl::InvalidArgumentError("fault_delay must be >= 0");
  for (int gpu : gpus) {
    if (gpu < 0) return absl::InvalidArgumentError("gpus must be CUDA device numbers");
  }
  return absl::OkStatus();
}

namespace {

// "E" or "E0-E1" items of a comma list, each in [0, num_experts).
absl::Status ParseRanges(absl::string_view text, int64_t num_experts,
                         std::vector<int32_t>* experts) {
  for (absl::string_view item : absl::StrSplit(text, ',')) {
    const std::vector<absl::string_view> ends = absl::StrSplit(item, absl::MaxSplits('-', 1));
    int64_t lo = 0, hi = 0;
    if (!absl::SimpleAtoi(ends.front(), &lo) || !absl::SimpleAtoi(ends.back(), &hi)) {
      return absl::InvalidArgumentError(
          absl::StrCat("expert spec: '", std::string(item), "' is not E or E0-E1"));
    }
    if (lo < 0 || hi < lo || hi >= num_experts) {
      return absl::InvalidArgumentError(absl::StrCat(
          "expert spec: '", std::string(item), "' is not a range within [0, ", num_experts, ")"));
    }
    for (int64_t e = lo; e <= hi; ++e) experts->push_back(static_cast<int32_t>(e));
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<std::vector<ExpertKey>> ParseExpertSpec(absl::string_view spec,
                                                       const MoeModelConfig& config) {
  std::vector<ExpertKey> keys;
  if (spec == "none") return keys;
  if (spec == "all") {
    for (int64_t layer : config.MoeLayers()) {
      for (int32_t e = 0; e < config.num_experts; ++e) keys.push_back({layer, e});
    }
    return keys;
  }
  if (spec.find(':') == absl::string_view::npos) {
    std::vector<int32_t> experts;
    RETURN_IF_ERROR(ParseRanges(spec, config.num_experts, &experts));
    for (int64_t layer : config.MoeLayers()) {
      for (int32_t e : experts) keys.push_back({layer, e});
    }
  } else {
    for (absl::string_view part : absl::StrSplit(spec, ';')) {
      const size_t colon = part.find(':');
      int64_t layer = 0;
      if (colon == absl::string_view::npos || !absl::SimpleAtoi(part.substr(0, colon), &layer)) {
        return absl::InvalidArgumentError(
            absl::StrCat("expert spec: '", std::string(part), "' is not LAYER:RANGES"));
      }
      const absl::Status layer_ok = config.CheckMoeLayer(layer);
      if (!layer_ok.ok()) {
        return absl::InvalidArgumentError(
            absl::StrCat("expert spec: ", std::string(layer_ok.message())));
      }
      std::vector<int32_t> experts;
      RETURN_IF_ERROR(ParseRanges(part.substr(colon + 1), config.num_experts, &experts));
      for (int32_t e : experts) keys.push_back({layer, e});
    }
  }
  std::sort(keys.begin(), keys.end());
  keys.erase(std::unique(keys.begin(), keys.end()), keys.end());
  return keys;
}

void ExpertServer::RunOnCpu(const std::vector<Batch>& batches, Scratch& scratch, float* y) {
  const MoeModelConfig& config = store_->config();
  const int64_t H = config.hidden_size, n = static_cast<int64_t>(batches.size());
  const int64_t rows = batches.empty() ? 0 : batches.back().row + batches.back().n;
  float* const x = Sized(scratch.x, rows * H + 1);
  pool_->ParallelFor(n, [&](int64_t i) {
    const Batch& b = batches[i];
    // Checked: F32 and BF16 always convert.
    ConvertToF32(b.rows.dtype(), b.rows.raw(), b.n * H, x + b.row * H);
  });
  scratch.batches.clear();
  for (const Batch& b : batches) {
    scratch.batches.push_back({b.weights->View(config), x + b.row * H, b.n, y + b.row * H});
  }
  const ExpertScratchSize size = ScratchFor(scratch.batches);
  // One more float keeps the pointers valid when every batch is empty.
  AssignScratch(scratch.batches, Sized(scratch.gu, size.gate_up + 1),
                Sized(scratch.h, size.hidden + 1));
  RunExpertBatches(*pool_, scratch.batches, scratch.tasks);
}

absl::Status ExpertServer::RunOnGpu(int64_t layer, const std::vector<Batch>& batches, float* y) {
  std::vector<GpuBatch> on_gpu;
  on_gpu.reserve(batches.size());
  for (const Batch& b : batches) on_gpu.push_back({b.expert, b.rows.raw(), b.rows.dtype(), b.n});
  return gpu_->Compute(layer, on_gpu, y);
}

absl::Status ExpertServer::WriteOutputs(const std::vector<Batch>& batches, DType dtype,
                                        const float* y, v1::ComputeResponse* resp) {
  const int64_t H = store_->config().hidden_size;
  // The entries exist before the parallel writes fill them, in request order.
  for (const Batch& b : batches) resp->add_outputs()->set_expert(b.expert);
  std::vector<absl::Status> written(batches.size());
  pool_->ParallelFor(static_cast<int64_t>(batches.size()), [&](int64_t i) {
    const Batch& b = batches[i];
    const Tensor out = Tensor::View(DType::kF32, {b.n, H}, y + b.row * H, nullptr);
    written[i] = ToProto(out, dtype, resp->mutable_outputs(static_cast<int>(i))->mutable_rows());
  });
  for (const absl::Status& s : written) RETURN_IF_ERROR(s);
  return absl::OkStatus();
}

absl::Status ExpertServer::Compute(const v1::ComputeRequest& req, const RowSegments& row_bytes,
                                   v1::ComputeResponse* resp) {
  const auto start = std::chrono::steady_clock::now();
  ASSIGN_OR_RETURN(const DType out_dtype, CheckComputeOutputDType(store_->config(), req));
  ASSIGN_OR_RETURN(const std::vector<Batch> batches, CheckComputeBatches(*store_, req, row_bytes));
  const int64_t rows = batches.empty() ? 0 : batches.back().row + batches.back().n;
  FreeList<Scratch>::Lease scratch = scratch_.Take();
  float* const y = Sized(scratch->y, rows * store_->config().hidden_size + 1);
  if (gpu_ != nullptr) {
    RETURN_IF_ERROR(RunOnGpu(req.layer(), batches, y));
  } else {
    RunOnCpu(batches, *scratch, y);
  }
  RETURN_IF_ERROR(WriteOutputs(batches, out_dtype, y, resp));
  if (metrics_ != nullptr) {
    metrics_->batch_tokens->Observe(static_cast<double>(rows));
    for (const Batch& b : batches) metrics_->CountRows(req.layer(), b.expert, b.n);
  }
  resp->set_compute_micros(std::chrono::duration_cast<std::chrono::microseconds>(
                               std::chrono::steady_clock::now() - start)
                               .count());
  return absl::OkStatus();
}

absl::Status ExpertServer::SyncGpu() {
  if (gpu_ == nullptr) return absl::OkStatus();
  MutexLock lock(&gpu_sync_mu_);
  return gpu_->Sync(*store_);
}

absl::Status ExpertServer::ServeCompute(const v1::ComputeRequest& req, const RowSegments& rows,
                                        v1::ComputeResponse* resp,
                                        const std::function<bool()>& cancelled) {
  const auto received = std::chrono::steady_clock::now();
  const absl::Status s = ComputeAdmitted(req, rows, resp, cancelled);
  if (!s.ok()) resp->Clear();
  if (Metrics* m = metrics_.get()) {
    m->requests->Increment(s.code());
    m->latency->Observe(
        std::chrono::duration<double>(std::chrono::steady_clock::now() - received).count());
  }
  return s;
}

absl::Status ExpertServer::ComputeAdmitted(const v1::ComputeRequest& req, const RowSegments& rows,
                                           v1::ComputeResponse* resp,
                                           const std::function<bool()>& cancelled) {
  // Refused with UNAVAILABLE once draining: the router retries on another replica.
  ASSIGN_OR_RETURN(const DrainGate::Admission admission, drain_.Admit());
  if (options_.fault_delay.count() > 0) std::this_thread::sleep_for(options_.fault_delay);
  // At most compute_threads calls compute at once; the rest wait their turn here.
  ConcurrencyLimit::Slot slot(*computing_);
  if (cancelled()) return absl::CancelledError("the caller cancelled before the call ran");
  return Compute(req, rows, resp);
}

// A synchronous service: each call runs on the gRPC thread that received it, so a
// Compute starts without waking another thread (on an idle machine every wake-up costs
// tens of microseconds). gRPC adds threads while all are busy.
class ExpertServer::Service final : public v1::ExpertService::Service {
 public:
  explicit Service(ExpertServer* server) : server_(server) {}

  grpc::Status Compute(grpc::ServerContext* ctx, const v1::ComputeRequest* req,
                       v1::ComputeResponse* resp) override {
    if (grpc::Status s = Authorize(*ctx); !s.ok()) return s;
    return ToGrpcStatus(
        server_->ServeCompute(*req, {}, resp, [ctx] { return ctx->IsCancelled(); }));
  }

  grpc::Status LoadExperts(grpc::ServerContext* ctx, const v1::LoadExpertsRequest* req,
                           v1::LoadExpertsResponse* resp) override {
    if (grpc::Status s = Authorize(*ctx); !s.ok()) return s;
    absl::Status s = server_->store_->Load(Keys(req->experts()));
    if (s.ok()) s = server_->SyncGpu();
    resp->set_experts_loaded(server_->store_->size());
    resp->set_weight_bytes(server_->store_->weight_bytes());
    return ToGrpcStatus(s);
  }

  grpc::Status UnloadExperts(grpc::ServerContext* ctx, const v1::UnloadExpertsRequest* req,
                             v1::UnloadExpertsResponse* resp) override {
    if (grpc::Status s = Authorize(*ctx); !s.ok()) return s;
    absl::Status s = server_->store_->Unload(Keys(req->experts()));
    if (s.ok()) s = server_->SyncGpu();
    resp->set_experts_loaded(server_->store_->size());
    resp->set_weight_bytes(server_->store_->weight_bytes());
    return ToGrpcStatus(s);
  }

  grpc::Status Info(grpc::ServerContext* ctx, const v1::InfoRequest* req,
                    v1::InfoResponse* resp) override {
    // Info hands out the UCX credential: it needs the same identity as Compute.
    if (grpc::Status s = Authorize(*ctx); !s.ok()) return s;
    const MoeModelConfig& c = server_->store_->config();
    resp->set_model_type(FamilyName(c.family));
    resp->set_hidden_size(c.hidden_size);
    resp->set_num_experts(c.num_experts);
    for (const auto& [layer, expert] : server_->store_->List()) {
      v1::ExpertId* id = resp->add_experts();
      id->set_layer(layer);
      id->set_expert(expert);
    }
    resp->set_weight_bytes(server_->store_->weight_bytes());
    resp->set_service_id(server_->options_.service_id);
    if (server_->ucx_ != nullptr) {
      resp->set_ucx_worker_address(server_->ucx_->worker_address());
      if (req->ucx_credential()) resp->set_ucx_credential(server_->ucx_->IssueCredential());
    }
    if (server_->gpu_ != nullptr) {
      std::vector<std::string> devices;
      for (const GpuDeviceMemory& m : server_->gpu_->Memory()) {
        devices.push_back(std::to_string(m.device));
        resp->set_gpu_weight_bytes(resp->gpu_weight_bytes() + m.weight_bytes);
        resp->set_gpu_workspace_bytes(resp->gpu_workspace_bytes() + m.workspace_bytes);
        resp->set_gpu_pinned_bytes(resp->gpu_pinned_bytes() + m.pinned_bytes);
        resp->set_gpu_free_bytes(resp->gpu_free_bytes() + m.device_free_bytes);
        resp->set_gpu_total_bytes(resp->gpu_total_bytes() + m.device_total_bytes);
        v1::GpuMemory* g = resp->add_gpus();
        g->set_device(m.device);
        g->set_experts(m.experts);
        g->set_weight_bytes(m.weight_bytes);
        g->set_workspace_bytes(m.workspace_bytes);
        g->set_pinned_bytes(m.pinned_bytes);
        g->set_free_bytes(m.device_free_bytes);
        g->set_total_bytes(m.device_total_bytes);
      }
      resp->set_gpu_local_moves(server_->gpu_->moves());
      resp->set_device(absl::StrCat("cuda:", absl::StrJoin(devices, ",")));
    } else {
      resp->set_device("cpu");
    }
    return grpc::Status::OK;
  }

 private:
  // Every call of this service is made by mesh components or operators: the admin identity.
  grpc::Status Authorize(const grpc::ServerContext& ctx) const {
    return server_->options_.security->Authorize(ctx, Access::kAdmin);
  }

  static std::vector<ExpertKey> Keys(const google::protobuf::RepeatedPtrField<v1::ExpertId>& ids) {
    std::vector<ExpertKey> keys;
    keys.reserve(ids.size());
    for (const v1::ExpertId& id : ids) keys.emplace_back(id.layer(), id.expert());
    return keys;
  }

  ExpertServer* const server_;
};

absl::StatusOr<std::unique_ptr<ExpertServer>> ExpertServer::Create(ExpertServerOptions options) {
  RETURN_IF_ERROR(options.Validate());
  auto s = std::unique_ptr<ExpertServer>(new ExpertServer());
  s->options_ = std::move(options);
  if (s->options_.security == nullptr) s->options_.security = Security::Insecure();
  ASSIGN_OR_RETURN(s->store_, ExpertStore::Open(s->options_.model_dir));
  RETURN_IF_ERROR(s->store_->Load(s->options_.experts));
  if (!s->options_.gpus.empty()) {
    GpuExpertsOptions g;
    g.devices = s->options_.gpus;
    g.rebalance_interval = s->options_.gpu_rebalance_interval;
    ASSIGN_OR_RETURN(s->gpu_, GpuExperts::Create(s->store_->config(), g));
    RETURN_IF_ERROR(s->SyncGpu());
  }
  if (s->options_.registry != nullptr) {
    RETURN_IF_ERROR(s->RegisterMetrics());
    RETURN_IF_ERROR(s->options_.security->ExportMetrics(*s->options_.registry));
  }
  s->computing_ = std::make_unique<ConcurrencyLimit>(s->options_.compute_threads);
  s->pool_ = s->options_.pool != nullptr ? s->options_.pool : &ThreadPool::Default();
  // Parallelism comes from the pool; a multi-threaded BLAS inside each task would
  // oversubscribe the cores.
  SetBlasThreads(1);
  if (s->options_.ucx) {
    ASSIGN_OR_RETURN(
        s->ucx_,
        UcxComputeServer::Create(
            [raw = s.get()](const v1::ComputeRequest& req, const RowSegments& rows,
                            v1::ComputeResponse* resp) {
              return raw->ServeCompute(req, rows, resp, [] { return false; });
            },
            s->options_.compute_threads, s->options_.max_message_bytes, s->options_.ucx_spin));
  }
  s->service_ = std::make_unique<Service>(s.get());
  ASSIGN_OR_RETURN(
      StartedServer started,
      StartGrpcServer({s->options_.listen, s->options_.max_message_bytes, s->options_.security},
                      {s->service_.get()}));
  s->server_ = std::move(started.server);
  s->port_ = started.port;
  // Only now: every initial expert is loaded and the port is open.
  s->server_->GetHealthCheckService()->SetServingStatus(true);
  return s;
}

ExpertServer::~ExpertServer() {
  if (server_ != nullptr) {
    Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(5));
    server_->Wait();
  }
}

void ExpertServer::Shutdown(std::chrono::system_clock::time_point deadline) {
  std::call_once(shutdown_once_, [&] {
    // Health first: watchers see NOT_SERVING rather than a refused connection. Then new
    // Compute calls are refused (UNAVAILABLE: the router takes another replica) while the
    // ones in flight finish; only then does the server stop accepting.
    server_->GetHealthCheckService()->SetServingStatus(false);
    drain_.Drain(deadline);
    server_->Shutdown(DrainGate::ShutdownDeadline(deadline));
  });
}

void ExpertServer::Wait() { server_->Wait(); }

}  // namespace moemesh
