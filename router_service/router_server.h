// The router's gRPC server: KServe v2 GRPCInferenceService in front of MoeRouter, the
// RouterControl API, grpc.health.v1 and server reflection.
//
// ModelInfer inputs: `hidden_states` FP32/FP16/BF16 [T, H] (raw_input_contents or
// fp32_contents) and optional `layer` INT32/INT64 [1] (default: the first MoE layer).
// Outputs: `output` (the input's datatype, [T, H]); on request `topk_ids` INT32 [T, k]
// and `topk_weights` FP32 [T, k]. Errors: INVALID_ARGUMENT (shape, dtype, byte count,
// unknown or dense layer, T = 0), NOT_FOUND (model), RESOURCE_EXHAUSTED (over the
// message limit), UNAVAILABLE (an expert's every replica down), DEADLINE_EXCEEDED.
//
// Health: SERVING only while every placement endpoint answers and holds its experts
// (checked every `health_interval`). Shutdown: NOT_SERVING, refuse new calls with
// UNAVAILABLE (a client retries another router), drain the ones in flight, stop.
#pragma once

#include <grpcpp/grpcpp.h>

#include <atomic>
#include <chrono>
#include <memory>
#include <string>
#include <thread>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "router_service/router.h"
#include "services/base/mutex.h"
#include "services/rpc/security.h"
#include "services/runtime/concurrency_limit.h"
#include "services/runtime/drain_gate.h"

namespace moemesh {

struct RouterServerOptions {
  std::string listen = "127.0.0.1:0";
  std::string model_name = "moe";
  int max_message_bytes = 256 << 20;
  std::chrono::milliseconds health_interval{500};
  // ModelInfer calls forwarded at once (each holds its layer's scratch); more wait, each
  // no longer than its deadline allows (less the recent call time): past that it is
  // refused DEADLINE_EXCEEDED at once rather than forwarded to time out.
  int max_concurrent_infers = 64;
  // Admission control: ModelInfer calls that would take the tokens in flight over this are
  // refused RESOURCE_EXHAUSTED at once (a call is let in alone whatever its size); 0: no
  // bound.
  int64_t max_inflight_tokens = 0;
  // TLS and the identities calls need (services/rpc/security.h): ModelInfer and
  // ModelMetadata the API token when one is set, the control calls the admin identity;
  // liveness and readiness stay open. Null: plaintext, unchecked.
  std::shared_ptr<Security> security;

  absl::Status Validate() const;
};

class RouterServer {
 public:
  static absl::StatusOr<std::unique_ptr<RouterServer>> Create(RouterServerOptions options,
                                                              std::unique_ptr<MoeRouter> router);
  ~RouterServer();

  int port() const { return port_; }
  MoeRouter& router() { return *router_; }
  bool ready() const { return ready_.load(); }
  // NOT_SERVING, then stop accepting and wait for in-flight calls until `deadline`.
  void Shutdown(std::chrono::system_clock::time_point deadline);
  void Wait();

 private:
  class InferenceService;
  class ControlService;
  RouterServer() = default;
  void HealthLoop() ABSL_LOCKS_EXCLUDED(mu_);

  RouterServerOptions options_;
  std::unique_ptr<MoeRouter> router_;
  std::unique_ptr<InferenceService> inference_;
  std::unique_ptr<ControlService> control_;
  std::unique_ptr<grpc::Server> server_;
  int port_ = 0;
  // Admission control's state: tokens of the calls admitted and not answered, and a moving
  // average of a call's time (seconds).
  std::atomic<int64_t> inflight_tokens_{0};
  std::atomic<double> call_seconds_{0};
  std::atomic<bool> ready_{false};

  Mutex mu_;
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  std::thread health_thread_;
  std::unique_ptr<ConcurrencyLimit> inferring_;  // max_concurrent_infers slots
  DrainGate drain_{"router"};
};

}  // namespace moemesh
