// The gRPC server setup both services share: listen address, message-size limits,
// grpc.health.v1 (starting NOT_SERVING) and server reflection.
#pragma once

#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/grpcpp.h>

#include <chrono>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "services/rpc/security.h"

namespace moemesh {

struct GrpcServerOptions {
  // HOST:PORT; port 0 picks a free port.
  std::string listen;
  // Bounds one request or reply in both directions.
  int max_message_bytes = 256 << 20;
  // The port's credentials (TLS, mutual TLS); null: plaintext.
  std::shared_ptr<const Security> security;
};

// INVALID_ARGUMENT unless `listen` is HOST:PORT with a port in [0, 65535] (gRPC would
// silently bind another port for a larger one) and the size limit is positive (gRPC
// reads a negative one as "unlimited").
absl::Status ValidateGrpcServerOptions(const GrpcServerOptions& options);

// Channel arguments both ends of a token-carrying connection use, sized for messages of
// megabytes: an HTTP/2 window that lets a whole layer call's rows through without
// waiting for window updates, large frames and large socket reads. With gRPC's
// defaults a 2 MB message crawls through 64 KB windows and 16 KB frames, each window
// update a round trip between processes.
std::vector<std::pair<std::string, int>> BulkTransferChannelArgs(int max_message_bytes);

struct StartedServer {
  std::unique_ptr<grpc::Server> server;
  int port = 0;  // the bound port
};

// Builds and starts a server for `services` (not owned; they must outlive it). A busy
// port is an error (UNAVAILABLE naming the address), not shared: gRPC's default
// SO_REUSEPORT would let a second service silently share it. Health starts NOT_SERVING.
absl::StatusOr<StartedServer> StartGrpcServer(const GrpcServerOptions& options,
                                              const std::vector<grpc::Service*>& services);

// grpc.health.v1.Health/Check for the whole server behind `channel` (no health stubs
// are installed here, so through a generic call): 1 SERVING, 2 NOT_SERVING; an error
// when the server does not answer in `timeout`.
absl::StatusOr<int> CheckHealth(const std::shared_ptr<grpc::Channel>& channel,
                                std::chrono::milliseconds timeout);

// grpc.health.v1.Health/Watch for the whole server behind a channel: the server sends its
// status at once and again on every change (a drain's NOT_SERVING while calls still run,
// which a Check made after the server stopped accepting calls could not see). One thread
// uses it.
class HealthWatch {
 public:
  static absl::StatusOr<std::unique_ptr<HealthWatch>> Start(
      const std::shared_ptr<grpc::Channel>& channel);
  ~HealthWatch();
  // The next status the server sends (1 SERVING, 2 NOT_SERVING); DEADLINE_EXCEEDED when
  // none comes within `timeout`, the stream's error when it ends.
  absl::StatusOr<int> Next(std::chrono::milliseconds timeout);

 private:
  HealthWatch() = default;
  // Waits for the completion of `tag`; false on timeout or failure.
  bool Await(void* tag, std::chrono::milliseconds timeout);

  grpc::ClientContext ctx_;
  grpc::CompletionQueue cq_;
  std::unique_ptr<grpc::GenericClientAsyncReaderWriter> call_;
  grpc::ByteBuffer reply_;
  bool reading_ = false;  // a Read is in flight
};

}  // namespace moemesh
