// The token data path between the router and the expert services, behind one interface:
// gRPC now (GrpcExpertTransport), UCX later, an in-process fake in unit tests.
//
// Compute sends one ComputeRequest (every token of one layer bound for one service) and
// calls `done` exactly once, from any thread, without blocking a thread while the call
// is in flight.
#pragma once

#include <chrono>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>

#include "absl/status/status.h"
#include "expert_service.grpc.pb.h"

namespace moemesh {

class ExpertTransport {
 public:
  using Clock = std::chrono::system_clock;
  // On OK, `response` holds the reply; it is valid only during the callback.
  using Done = std::function<void(const absl::Status& status, v1::ComputeResponse* response)>;

  virtual ~ExpertTransport() = default;
  virtual void Compute(const std::string& endpoint, std::unique_ptr<v1::ComputeRequest> request,
                       Clock::time_point deadline, Done done) = 0;
  // Blocking Info call, for readiness checks.
  virtual absl::Status Info(const std::string& endpoint, Clock::time_point deadline,
                            v1::InfoResponse* response) = 0;
};

struct GrpcTransportOptions {
  int max_message_bytes = 256 << 20;
};

// One channel per endpoint, created on first use. Endpoints are gRPC targets:
// "host:port", or a DNS name ("expert-0.experts.ns.svc:50051", Kubernetes headless
// services) which gRPC's resolver looks up and re-resolves on reconnect.
class GrpcExpertTransport : public ExpertTransport {
 public:
  explicit GrpcExpertTransport(GrpcTransportOptions options = {}) : options_(options) {}

  void Compute(const std::string& endpoint, std::unique_ptr<v1::ComputeRequest> request,
               Clock::time_point deadline, Done done) override;
  absl::Status Info(const std::string& endpoint, Clock::time_point deadline,
                    v1::InfoResponse* response) override;

 private:
  v1::ExpertService::Stub* StubFor(const std::string& endpoint);

  const GrpcTransportOptions options_;
  std::mutex mu_;
  std::unordered_map<std::string, std::unique_ptr<v1::ExpertService::Stub>> stubs_;  // guarded by mu_
};

}  // namespace moemesh
