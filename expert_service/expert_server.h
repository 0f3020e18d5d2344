// ExpertServer: the expert service's gRPC server (callback API) — Compute, LoadExperts,
// UnloadExperts, Info — plus grpc.health.v1 and reflection.
//
// Compute runs every batch of a request with the kernels' canonical task split on a
// ThreadPool, so its rows are bit-identical to what the in-process MoeLayer computes.
// Concurrent callers (several routers) share the pool; nothing serialises them.
#pragma once

#include <chrono>
#include <memory>
#include <string>
#include <vector>

#include <grpcpp/grpcpp.h>

#include "absl/status/statusor.h"
#include "expert_service.grpc.pb.h"
#include "expert_service/expert_store.h"
#include "kernels/cpu/thread_pool.h"

namespace moemesh {

struct ExpertServerOptions {
  std::string model_dir;
  std::string listen = "127.0.0.1:0";
  std::string service_id = "expert";
  std::string experts = "all";  // ParseExpertSpec grammar
  int max_message_bytes = 256 << 20;
  ThreadPool* pool = nullptr;  // nullptr: ThreadPool::Default()

  absl::Status Validate() const;
};

class ExpertServer {
 public:
  static absl::StatusOr<std::unique_ptr<ExpertServer>> Create(ExpertServerOptions options);
  ~ExpertServer();

  int port() const { return port_; }
  ExpertStore& store() { return *store_; }
  // NOT_SERVING, stop accepting, drain in-flight calls until `deadline`.
  void Shutdown(std::chrono::system_clock::time_point deadline);
  void Wait();

  // The computation behind Compute, callable without gRPC (tests, benchmarks).
  absl::Status Compute(const v1::ComputeRequest& request, v1::ComputeResponse* response);

 private:
  class Service;
  ExpertServer() = default;

  ExpertServerOptions options_;
  std::unique_ptr<Checkpoint> ckpt_;
  MoeModelConfig config_;
  std::unique_ptr<ExpertStore> store_;
  ThreadPool* pool_ = nullptr;
  std::unique_ptr<Service> service_;
  std::unique_ptr<grpc::Server> server_;
  int port_ = 0;
  bool shut_down_ = false;
};

}  // namespace moemesh
