#include "services/transport.h"

#include <grpcpp/grpcpp.h>

#include "services/wire.h"

namespace moemesh {
namespace {

// State of one in-flight Compute; deleted by its completion callback.
struct ComputeCall {
  grpc::ClientContext context;
  std::unique_ptr<v1::ComputeRequest> request;
  v1::ComputeResponse response;
  ExpertTransport::Done done;
};

}  // namespace

v1::ExpertService::Stub* GrpcExpertTransport::StubFor(const std::string& endpoint) {
  std::lock_guard<std::mutex> lock(mu_);
  auto& stub = stubs_[endpoint];
  if (!stub) {
    grpc::ChannelArguments args;
    args.SetMaxReceiveMessageSize(options_.max_message_bytes);
    args.SetMaxSendMessageSize(options_.max_message_bytes);
    // Reconnect quickly when a restarted expert service comes back.
    args.SetInt(GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS, 100);
    args.SetInt(GRPC_ARG_MAX_RECONNECT_BACKOFF_MS, 1000);
    stub = v1::ExpertService::NewStub(
        grpc::CreateCustomChannel(endpoint, grpc::InsecureChannelCredentials(), args));
  }
  return stub.get();
}

void GrpcExpertTransport::Compute(const std::string& endpoint,
                                  std::unique_ptr<v1::ComputeRequest> request,
                                  Clock::time_point deadline, Done done) {
  auto* call = new ComputeCall;
  call->request = std::move(request);
  call->done = std::move(done);
  call->context.set_deadline(deadline);
  StubFor(endpoint)->async()->Compute(&call->context, call->request.get(), &call->response,
                                      [call](grpc::Status s) {
                                        call->done(FromGrpcStatus(s), &call->response);
                                        delete call;
                                      });
}

absl::Status GrpcExpertTransport::Info(const std::string& endpoint, Clock::time_point deadline,
                                       v1::InfoResponse* response) {
  grpc::ClientContext context;
  context.set_deadline(deadline);
  return FromGrpcStatus(StubFor(endpoint)->Info(&context, v1::InfoRequest(), response));
}

}  // namespace moemesh
