#include "services/rpc/grpc_server.h"

#include <grpcpp/ext/proto_server_reflection_plugin.h>
#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/health_check_service_interface.h>

#include <algorithm>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "services/rpc/wire.h"

namespace moemesh {

absl::Status ValidateGrpcServerOptions(const GrpcServerOptions& options) {
  const std::string& listen = options.listen;
  const size_t colon = listen.rfind(':');
  int port = -1;
  if (colon == std::string::npos || colon == 0 ||
      !absl::SimpleAtoi(absl::string_view(listen).substr(colon + 1), &port)) {
    return absl::InvalidArgumentError(absl::StrCat("listen '", listen, "' is not HOST:PORT"));
  }
  if (port < 0 || port > 65535) {
    return absl::InvalidArgumentError(
        absl::StrCat("listen '", listen, "': port out of [0, 65535]"));
  }
  if (options.max_message_bytes <= 0) {
    return absl::InvalidArgumentError("max_message_bytes must be positive");
  }
  return absl::OkStatus();
}

std::vector<std::pair<std::string, int>> BulkTransferChannelArgs(int max_message_bytes) {
  const int window = std::clamp(max_message_bytes, 1 << 20, 1 << 30);
  return {
      {GRPC_ARG_HTTP2_STREAM_LOOKAHEAD_BYTES, window},
      {GRPC_ARG_HTTP2_MAX_FRAME_SIZE, (1 << 24) - 1},  // the HTTP/2 maximum
      {GRPC_ARG_HTTP2_WRITE_BUFFER_SIZE, window},
      {GRPC_ARG_TCP_READ_CHUNK_SIZE, 1 << 20},
      {GRPC_ARG_TCP_MAX_READ_CHUNK_SIZE, 16 << 20},
  };
}

absl::StatusOr<StartedServer> StartGrpcServer(const GrpcServerOptions& options,
                                              const std::vector<grpc::Service*>& services) {
  if (absl::Status s = ValidateGrpcServerOptions(options); !s.ok()) return s;
  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  builder.AddChannelArgument(GRPC_ARG_ALLOW_REUSEPORT, 0);
  StartedServer started;
  builder.AddListeningPort(options.listen,
                           options.security != nullptr ? options.security->ServerCredentials()
                                                       : grpc::InsecureServerCredentials(),
                           &started.port);
  builder.SetMaxReceiveMessageSize(options.max_message_bytes);
  builder.SetMaxSendMessageSize(options.max_message_bytes);
  for (const auto& [name, value] : BulkTransferChannelArgs(options.max_message_bytes)) {
    builder.AddChannelArgument(name, value);
  }
  for (grpc::Service* service : services) builder.RegisterService(service);
  started.server = builder.BuildAndStart();
  if (started.server == nullptr || started.port == 0) {
    return absl::UnavailableError(absl::StrCat("cannot listen on ", options.listen));
  }
  started.server->GetHealthCheckService()->SetServingStatus(false);
  return started;
}

namespace {

// A HealthCheckResponse's status: field 1, a varint (absent when 0, UNKNOWN).
absl::StatusOr<int> HealthStatus(const grpc::ByteBuffer& response) {
  std::vector<grpc::Slice> slices;
  if (!response.Dump(&slices).ok()) return absl::InternalError("health reply: unreadable");
  std::string bytes;
  for (const auto& slice : slices) {
    bytes.append(reinterpret_cast<const char*>(slice.begin()), slice.size());
  }
  if (bytes.empty()) return 0;
  if (bytes.size() != 2 || bytes[0] != 0x08) {
    return absl::InternalError("health reply: not a HealthCheckResponse");
  }
  return static_cast<int>(bytes[1]);
}

}  // namespace

absl::StatusOr<int> CheckHealth(const std::shared_ptr<grpc::Channel>& channel,
                                std::chrono::milliseconds timeout) {
  grpc::GenericStub generic(channel);
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + timeout);
  grpc::Slice no_bytes;  // HealthCheckRequest{service: ""} serialises to nothing
  grpc::ByteBuffer request(&no_bytes, 1), response;
  grpc::CompletionQueue cq;
  auto call = generic.PrepareUnaryCall(&ctx, "/grpc.health.v1.Health/Check", request, &cq);
  call->StartCall();
  grpc::Status status;
  call->Finish(&response, &status, nullptr);
  void* tag;
  bool ok;
  cq.Next(&tag, &ok);
  if (!status.ok()) return FromGrpcStatus(status);
  return HealthStatus(response);
}

absl::StatusOr<std::unique_ptr<HealthWatch>> HealthWatch::Start(
    const std::shared_ptr<grpc::Channel>& channel) {
  auto w = std::unique_ptr<HealthWatch>(new HealthWatch());
  grpc::GenericStub generic(channel);
  w->call_ = generic.PrepareCall(&w->ctx_, "/grpc.health.v1.Health/Watch", &w->cq_);
  w->call_->StartCall(w.get());
  if (!w->Await(w.get(), std::chrono::seconds(10))) {
    return absl::UnavailableError("health watch: the call did not start");
  }
  grpc::Slice no_bytes;  // HealthCheckRequest{service: ""}
  grpc::ByteBuffer request(&no_bytes, 1);
  w->call_->Write(request, &w->reply_);
  if (!w->Await(&w->reply_, std::chrono::seconds(10))) {
    return absl::UnavailableError("health watch: the request was not sent");
  }
  w->call_->WritesDone(&w->ctx_);
  if (!w->Await(&w->ctx_, std::chrono::seconds(10))) {
    return absl::UnavailableError("health watch: the request was not closed");
  }
  return w;
}

HealthWatch::~HealthWatch() {
  ctx_.TryCancel();
  cq_.Shutdown();
  void* tag;
  bool ok;
  while (cq_.Next(&tag, &ok)) {
  }
}

bool HealthWatch::Await(void* tag, std::chrono::milliseconds timeout) {
  const auto deadline = std::chrono::system_clock::now() + timeout;
  while (true) {
    void* got = nullptr;
    bool ok = false;
    const auto s = cq_.AsyncNext(&got, &ok, deadline);
    if (s != grpc::CompletionQueue::GOT_EVENT) return false;
    if (got == tag) return ok;
  }
}

absl::StatusOr<int> HealthWatch::Next(std::chrono::milliseconds timeout) {
  if (!reading_) {
    reply_.Clear();
    call_->Read(&reply_, &reading_);
    reading_ = true;
  }
  const auto deadline = std::chrono::system_clock::now() + timeout;
  void* got = nullptr;
  bool ok = false;
  const auto s = cq_.AsyncNext(&got, &ok, deadline);
  if (s != grpc::CompletionQueue::GOT_EVENT) {
    return absl::DeadlineExceededError("health watch: no status within the timeout");
  }
  reading_ = false;
  if (!ok) {
    grpc::Status status;
    call_->Finish(&status, &status);
    Await(&status, std::chrono::seconds(5));
    return absl::UnavailableError(absl::StrCat("health watch ended: ", status.error_message()));
  }
  return HealthStatus(reply_);
}

}  // namespace moemesh
