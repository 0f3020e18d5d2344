// ExpertServer: the expert service's gRPC server — moemesh.v1.ExpertService (Compute,
// LoadExperts, UnloadExperts, Info), plus grpc.health.v1 and server reflection.
//
// Compute runs every batch of a request in float32 with the expert task schedule MoeLayer
// runs (services/moe/expert_tasks.h), so its rows are bit-identical to the in-process
// layer's. Concurrent calls (several routers) share the pool; no lock is held while
// computing. With --device cuda (options.gpus) the batches run on GPUs instead
// (gpu_experts.h), within BF16 tolerance of the CPU; LoadExperts/UnloadExperts keep the
// GPUs in step and Info reports their memory. Compute is served over gRPC and, with
// options.ucx, over UCX too (services/transport/ucx/compute_server.h).
//
// Compute errors, each naming the layer and expert and what is wrong; the call fails,
// the server stays up:
//   INVALID_ARGUMENT  layer missing or dense; expert out of range or given twice; rows
//                     not [n, hidden_size], or not F32/BF16, or a byte count that does
//                     not match; output_dtype not F32/BF16
//   NOT_FOUND         a valid expert this service does not hold (the router's
//                     placement is stale)
//   CANCELLED         the caller gave up before the call was computed
//   UNAVAILABLE       the service is draining (after Shutdown began): try another replica
// LoadExperts/UnloadExperts: ExpertStore's errors (INVALID_ARGUMENT naming the pair).
//
// Health: SERVING once the initial experts are loaded; Shutdown turns it NOT_SERVING,
// refuses new calls and drains the ones in flight.
#pragma once

#include <grpcpp/grpcpp.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "expert_service.grpc.pb.h"
#include "expert_service/compute_request.h"
#include "expert_service/expert_store.h"
#include "expert_service/gpu_experts.h"
#include "services/base/mutex.h"
#include "services/base/scratch.h"
#include "services/base/thread_pool.h"
#include "services/mesh/load_stats.h"
#include "services/metrics/metrics.h"
#include "services/moe/expert_tasks.h"
#include "services/rpc/security.h"
#include "services/runtime/concurrency_limit.h"
#include "services/runtime/drain_gate.h"
#include "services/transport/transport.h"
#include "services/transport/ucx/compute_server.h"
#include "services/transport/ucx/protocol.h"

namespace moemesh {

struct ExpertServerOptions {
  // Hugging Face checkpoint folder the experts are read from.
  std::string model_dir;
  // gRPC listen address; port 0 picks a free port (ExpertServer::port()).
  std::string listen = "127.0.0.1:0";
  // Names the service in Info, logs and metrics.
  std::string service_id = "expert";
  // Loaded before the server reports SERVING (see ParseExpertSpec).
  std::vector<ExpertKey> experts;
  // Bounds one request or reply, so one call cannot exhaust the service's memory.
  int max_message_bytes = 256 << 20;
  // Calls computed at once; each such thread also works on its own ParallelFor. More
  // calls wait their turn: the work is CPU-bound, so more would only contend.
  int compute_threads = 4;
  // Runs the FFN tasks; not owned. nullptr: ThreadPool::Default().
  ThreadPool* pool = nullptr;
  // Where the service's metrics go (docs/metrics.md); not owned, must outlive the
  // server and not be collected after it is gone. nullptr: no metrics.
  metrics::Registry* registry = nullptr;
  // Which per-expert series to export (ExpertSeriesSelection::Parse).
  std::string expert_metrics = "auto";
  // Also serve Compute over UCX (services/transport/ucx/compute_server.h); Info then carries the
  // worker address. gRPC serves every call either way.
  bool ucx = false;
  // How long the UCX worker polls after its last message before it sleeps.
  std::chrono::microseconds ucx_spin = kUcxDefaultSpin;
  // TLS and the identity every call needs (services/rpc/security.h); null: plaintext,
  // unchecked.
  std::shared_ptr<Security> security;
  // Where the experts compute: none on the CPU (float32, bit-identical to MoeLayer), else
  // on these CUDA devices (--device cuda --gpu N[,N...]: BF16 weights resident there,
  // spread over them, expert_service/gpu_experts.h; within BF16 tolerance of the CPU).
  std::vector<int> gpus;
  // Several GPUs: how often their load is evened out by moving experts between them.
  std::chrono::milliseconds gpu_rebalance_interval{5000};
  // Fault injection, for drills and for tests of slow services: every Compute waits this
  // long before it computes (counted in flight meanwhile). 0 in production.
  std::chrono::milliseconds fault_delay{0};

  absl::Status Validate() const;
};

// Parses an expert list (the --experts flag) against a model's config:
//   "all"              every expert of every MoE layer
//   "none"             no expert (load them later with LoadExperts)
//   RANGES             those experts in every MoE layer
//   L:RANGES;L:RANGES  per MoE layer L
// where RANGES is a comma list of E or E0-E1 (inclusive), e.g. "0-3", "0-1,5",
// "1:0-3;2:4-7". Result: sorted, without duplicates. INVALID_ARGUMENT naming the bad
// part (syntax, expert out of range, reversed range, dense or missing layer).
absl::StatusOr<std::vector<ExpertKey>> ParseExpertSpec(absl::string_view spec,
                                                       const MoeModelConfig& config);

class ExpertServer {
 public:
  // Loads options.experts, then starts serving.
  static absl::StatusOr<std::unique_ptr<ExpertServer>> Create(ExpertServerOptions options);
  // Shuts down (5 s drain) if Shutdown was not called.
  ~ExpertServer();
  ExpertServer(const ExpertServer&) = delete;
  ExpertServer& operator=(const ExpertServer&) = delete;

  // The bound port (the real one when listen asked for port 0).
  int port() const { return port_; }
  ExpertStore& store() { return *store_; }
  // Compute calls accepted and not yet answered (queued or computing).
  int64_t in_flight() const { return drain_.in_flight(); }
  // Whether it takes calls: from Create until Shutdown begins (what health reports).
  bool serving() const { return !drain_.draining(); }

  // Health NOT_SERVING, then stop accepting calls and wait for the ones in flight until
  // `deadline` (gRPC cancels what is left then). Idempotent; thread-safe.
  void Shutdown(std::chrono::system_clock::time_point deadline);
  // Blocks until the server has shut down.
  void Wait();

 private:
  class Service;
  struct Metrics;
  ExpertServer();
  absl::Status RegisterMetrics();

  // One batch of a Compute call, checked (expert_service/compute_request.h).
  using Batch = ComputeBatch;
  // Compute's buffers, reused through a free list and only ever grown.
  struct Scratch {
    std::vector<float> x, y, gu, h;
    std::vector<ExpertBatch> batches;
    std::vector<ExpertTask> tasks;
  };

  // The body of the Compute RPC. `rows`, when not empty, holds each batch's row bytes
  // (which then travelled outside the message: the UCX data plane). Steps: check
  // everything, compute on the CPU or the GPU, write the outputs, count.
  absl::Status Compute(const v1::ComputeRequest& request, const RowSegments& rows,
                       v1::ComputeResponse* response);
  // Float32 and bit-identical to MoeLayer (services/moe/expert_tasks.h): y [Σn, H].
  void RunOnCpu(const std::vector<Batch>& batches, Scratch& scratch, float* y);
  absl::Status RunOnGpu(int64_t layer, const std::vector<Batch>& batches, float* y);
  absl::Status WriteOutputs(const std::vector<Batch>& batches, DType dtype, const float* y,
                            v1::ComputeResponse* response);
  // Compute with what every transport shares: admission (refused while draining), the
  // compute_threads limit, metrics.
  absl::Status ServeCompute(const v1::ComputeRequest& request, const RowSegments& rows,
                            v1::ComputeResponse* response, const std::function<bool()>& cancelled);
  absl::Status ComputeAdmitted(const v1::ComputeRequest& request, const RowSegments& rows,
                               v1::ComputeResponse* response,
                               const std::function<bool()>& cancelled);

  ExpertServerOptions options_;
  std::unique_ptr<ExpertStore> store_;
  ThreadPool* pool_ = nullptr;
  DrainGate drain_{"expert service"};

  std::unique_ptr<ConcurrencyLimit> computing_;  // compute_threads slots
  std::unique_ptr<Metrics> metrics_;             // null without options_.registry

  std::once_flag shutdown_once_;
  std::unique_ptr<Service> service_;
  // After service_ so it is destroyed first: the server may use the service until then.
  std::unique_ptr<grpc::Server> server_;
  int port_ = 0;

  FreeList<Scratch> scratch_;

  // --device cuda: the experts on the GPU (kept in step with store_ by SyncGpu).
  std::unique_ptr<GpuExperts> gpu_;
  Mutex gpu_sync_mu_;  // one SyncGpu at a time
  absl::Status SyncGpu() ABSL_LOCKS_EXCLUDED(gpu_sync_mu_);

  // Last: destroyed first, while everything its computing threads use is still there.
  std::unique_ptr<UcxComputeServer> ucx_;
};

}  // namespace moemesh
