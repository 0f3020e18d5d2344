// GrpcExpertTransport: ExpertTransport over gRPC's async API, the portable data plane.
// One channel per endpoint, made on first use; endpoints are gRPC targets ("host:port", or
// a DNS name such as a Kubernetes headless service's pod name, re-resolved on reconnect).
// An exchange polls a completion queue of its own. Thread-safe.
#pragma once

#include <memory>
#include <string>
#include <unordered_map>

#include "absl/base/thread_annotations.h"
#include "expert_service.grpc.pb.h"
#include "services/base/mutex.h"
#include "services/rpc/security.h"
#include "services/transport/transport.h"

namespace moemesh {

struct GrpcTransportOptions {
  int max_message_bytes = 256 << 20;
  // The credentials the expert services are dialed with; null: plaintext.
  std::shared_ptr<Security> security;
};

class GrpcExpertTransport : public ExpertTransport {
 public:
  explicit GrpcExpertTransport(GrpcTransportOptions options = {});

  std::unique_ptr<Exchange> NewExchange(Clock::time_point deadline) override;
  absl::Status Info(const std::string& endpoint, const v1::InfoRequest& request,
                    Clock::time_point deadline, v1::InfoResponse* response) override;

  // The endpoint's stub, created on first use; lives as long as the transport.
  v1::ExpertService::Stub* StubFor(const std::string& endpoint);

 private:
  GrpcTransportOptions options_;
  Mutex mu_;
  std::unordered_map<std::string, std::unique_ptr<v1::ExpertService::Stub>> stubs_
      ABSL_GUARDED_BY(mu_);
};

}  // namespace moemesh
