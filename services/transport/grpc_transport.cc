#include "services/transport/grpc_transport.h"

#include <grpcpp/grpcpp.h>

#include <vector>

#include "services/rpc/grpc_server.h"
#include "services/rpc/wire.h"

namespace moemesh {
namespace {

class GrpcExchange : public ExpertTransport::Exchange {
 public:
  GrpcExchange(GrpcExpertTransport* transport, ExpertTransport::Clock::time_point deadline)
      : transport_(transport), deadline_(deadline) {}

  ~GrpcExchange() override {
    Wait();
    cq_.Shutdown();
    void* tag;
    bool ok;
    while (cq_.Next(&tag, &ok)) {
    }
  }

  void Start(const std::string& endpoint, std::unique_ptr<v1::ComputeRequest> request,
             ExpertTransport::Done done) override {
    auto call = std::make_unique<Call>();
    call->context.set_deadline(deadline_);
    call->request = std::move(request);
    call->done = std::move(done);
    call->reader =
        transport_->StubFor(endpoint)->AsyncCompute(&call->context, *call->request, &cq_);
    call->reader->Finish(&call->response, &call->status, call.get());
    calls_.push_back(std::move(call));
    ++pending_;
  }

  void Wait() override { WaitUntil(ExpertTransport::Clock::time_point::max(), nullptr); }

  bool WaitUntil(ExpertTransport::Clock::time_point until,
                 const std::function<bool()>& enough) override {
    while (pending_ > 0) {
      if (enough && enough()) return false;
      void* tag = nullptr;
      bool ok = false;
      const grpc::CompletionQueue::NextStatus next =
          until == ExpertTransport::Clock::time_point::max()
              ? (cq_.Next(&tag, &ok) ? grpc::CompletionQueue::GOT_EVENT
                                     : grpc::CompletionQueue::SHUTDOWN)
              : cq_.AsyncNext(&tag, &ok, until);
      if (next == grpc::CompletionQueue::TIMEOUT) return false;
      if (next == grpc::CompletionQueue::SHUTDOWN) break;  // only after Shutdown, later
      --pending_;
      Call* call = static_cast<Call*>(tag);
      call->finished = true;
      call->done(FromGrpcStatus(call->status), &call->response);
    }
    return true;
  }

  // The calls end on the wire (the service sees its call cancelled); their `done` runs
  // with CANCELLED inside the next Wait.
  void CancelAll() override {
    for (auto& call : calls_) {
      if (!call->finished) call->context.TryCancel();
    }
  }

 private:
  struct Call {
    grpc::ClientContext context;
    std::unique_ptr<v1::ComputeRequest> request;
    v1::ComputeResponse response;
    grpc::Status status;
    ExpertTransport::Done done;
    std::unique_ptr<grpc::ClientAsyncResponseReader<v1::ComputeResponse>> reader;
    bool finished = false;  // its `done` has run
  };

  GrpcExpertTransport* const transport_;
  const ExpertTransport::Clock::time_point deadline_;
  grpc::CompletionQueue cq_;
  std::vector<std::unique_ptr<Call>> calls_;
  int pending_ = 0;
};

}  // namespace

GrpcExpertTransport::GrpcExpertTransport(GrpcTransportOptions options)
    : options_(std::move(options)) {
  if (options_.security == nullptr) options_.security = Security::Insecure();
}

v1::ExpertService::Stub* GrpcExpertTransport::StubFor(const std::string& endpoint) {
  MutexLock lock(&mu_);
  auto& stub = stubs_[endpoint];
  if (!stub) {
    grpc::ChannelArguments args;
    args.SetMaxReceiveMessageSize(options_.max_message_bytes);
    args.SetMaxSendMessageSize(options_.max_message_bytes);
    for (const auto& [name, value] : BulkTransferChannelArgs(options_.max_message_bytes)) {
      args.SetInt(name, value);
    }
    // Reconnect quickly when a restarted expert service comes back.
    args.SetInt(GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS, 100);
    args.SetInt(GRPC_ARG_MAX_RECONNECT_BACKOFF_MS, 1000);
    stub = v1::ExpertService::NewStub(options_.security->Dial(endpoint, args));
  }
  return stub.get();
}

std::unique_ptr<ExpertTransport::Exchange> GrpcExpertTransport::NewExchange(
    Clock::time_point deadline) {
  return std::make_unique<GrpcExchange>(this, deadline);
}

absl::Status GrpcExpertTransport::Info(const std::string& endpoint, const v1::InfoRequest& request,
                                       Clock::time_point deadline, v1::InfoResponse* response) {
  grpc::ClientContext context;
  context.set_deadline(deadline);
  return FromGrpcStatus(StubFor(endpoint)->Info(&context, request, response));
}

}  // namespace moemesh
