// The token data path between the router and the expert services, behind one interface:
// gRPC (GrpcExpertTransport), UCX (services/transport/ucx/ucx_transport.h), an in-process fake in unit
// tests.
//
// One MoE layer call opens an Exchange, sends one ComputeRequest per destination service
// (every token of the layer bound there), does other work while they fly (the shared
// expert), then Waits. The router builds each request in the memory its transport sends
// from (OutgoingRequest): the rows are written once, where they leave. Every completion
// runs on the waiting thread, inside Wait: the thread that needs the replies is the one
// woken, with no hand-off through another thread, and the caller's completion code needs
// no lock. No thread is blocked per call.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>

#include "absl/status/status.h"
#include "expert_service.grpc.pb.h"
#include "services/base/tensor.h"

namespace moemesh {

// A ComputeRequest under construction, in the memory its transport sends from: the
// caller writes (converts) each batch's rows once, straight to where they leave from (a
// UCX registered buffer; the protobuf's own bytes field over gRPC), instead of into the
// protobuf and then again into the transport's buffer.
class OutgoingRequest {
 public:
  virtual ~OutgoingRequest() = default;
  // Everything but the rows (layer, epoch, output dtype) is set here directly; batches
  // are added only through AddRows.
  v1::ComputeRequest& request() { return request_; }
  // Adds a batch of rows of `dtype` and `shape` for `expert`; returns where its
  // numel * DTypeSize(dtype) bytes are to be written (valid until the next AddRows or the
  // send), or nullptr if there is no memory for them.
  virtual char* AddRows(int32_t expert, DType dtype, const std::vector<int64_t>& shape);
  // The request as a protobuf, its rows inside.
  virtual std::unique_ptr<v1::ComputeRequest> TakeProto();

 protected:
  // Appends a batch for `expert` whose rows are `dtype` of `shape` (data left empty);
  // returns the bytes its rows take.
  size_t AddBatch(int32_t expert, DType dtype, const std::vector<int64_t>& shape);

  v1::ComputeRequest request_;
};

class ExpertTransport {
 public:
  using Clock = std::chrono::system_clock;
  // On OK, `response` holds the reply; it is valid only during the call.
  using Done = std::function<void(const absl::Status& status, v1::ComputeResponse* response)>;

  // The calls of one layer call. Used by one thread.
  class Exchange {
   public:
    // Waits for the calls still in flight (their `done` runs) before it is destroyed.
    virtual ~Exchange() = default;
    // Sends `request` to `endpoint`; returns without waiting for the reply. `done` runs
    // exactly once, inside Wait, with the reply or the call's error (UNAVAILABLE for an
    // unreachable service, DEADLINE_EXCEEDED past the exchange's deadline, ...).
    virtual void Start(const std::string& endpoint, std::unique_ptr<v1::ComputeRequest> request,
                       Done done) = 0;
    // A request to fill and Send: rows written in place (see OutgoingRequest).
    // `row_bytes` and `batches` are what it will hold (more is allowed, at a copy).
    virtual std::unique_ptr<OutgoingRequest> NewRequest(size_t row_bytes, int batches);
    // Sends a request from NewRequest, as Start does.
    virtual void Send(const std::string& endpoint, std::unique_ptr<OutgoingRequest> request,
                      Done done);
    // Returns when every started call has completed and its `done` has run.
    virtual void Wait() = 0;
  };

  virtual ~ExpertTransport() = default;
  // Every call of the exchange ends by `deadline`.
  virtual std::unique_ptr<Exchange> NewExchange(Clock::time_point deadline) = 0;
  // Blocking Info call, for readiness checks.
  virtual absl::Status Info(const std::string& endpoint, Clock::time_point deadline,
                            v1::InfoResponse* response) = 0;
};

// An Exchange over a callback-style send, for transports whose replies arrive on other
// threads (the UCX worker, the in-process fake): completions are queued from any thread
// and run inside Wait, where `read` turns each reply into the response handed to `done`
// (so a UCX reply is parsed by the thread that waits for it, not by the worker). Before
// it sleeps, Wait lets `poll` (if set) drive the transport itself until a completion is
// queued or the transport gives up (UCX polls for a short while: no wakeup per reply).
template <typename Reply>
class QueuedExchange : public ExpertTransport::Exchange {
 public:
  using Complete = std::function<void(absl::Status, Reply)>;
  // Sends a request and calls `complete` exactly once, from any thread.
  using Send = std::function<void(const std::string& endpoint,
                                  std::unique_ptr<v1::ComputeRequest> request, Complete complete)>;
  // Fills the response from an OK reply, on the waiting thread.
  using Read = std::function<absl::Status(Reply& reply, v1::ComputeResponse* response)>;
  // Runs the transport's progress on this thread until `ready()` or it gives up.
  using Poll = std::function<void(const std::function<bool()>& ready)>;

  QueuedExchange(Send send, Read read, Poll poll = nullptr)
      : send_(std::move(send)), read_(std::move(read)), poll_(std::move(poll)) {}
  ~QueuedExchange() override { Wait(); }

  void Start(const std::string& endpoint, std::unique_ptr<v1::ComputeRequest> request,
             ExpertTransport::Done done) override {
    send_(endpoint, std::move(request), Track(std::move(done)));
  }

  // A call about to be sent: `done` runs inside Wait once the returned completion has
  // been called (exactly once, from any thread).
  Complete Track(ExpertTransport::Done done) {
    dones_.push_back(std::move(done));
    ExpertTransport::Done* slot = &dones_.back();
    ++pending_;
    return [this, slot](absl::Status status, Reply reply) {
      std::lock_guard<std::mutex> lock(mu_);
      completed_.push_back({std::move(status), std::move(reply), slot});
      queued_.fetch_add(1, std::memory_order_release);
      cv_.notify_all();
    };
  }

  void Wait() override {
    v1::ComputeResponse response;
    while (pending_ > 0) {
      Completion c;
      if (poll_ && queued_.load(std::memory_order_acquire) == 0) {
        poll_([this] { return queued_.load(std::memory_order_acquire) > 0; });
      }
      {
        std::unique_lock<std::mutex> lock(mu_);
        cv_.wait(lock, [&] { return !completed_.empty(); });
        c = std::move(completed_.front());
        completed_.pop_front();
        queued_.fetch_sub(1, std::memory_order_relaxed);
      }
      --pending_;
      if (c.status.ok()) c.status = read_(c.reply, &response);
      c.reply = Reply();  // released (a UCX buffer back to its pool) before `done` runs
      (*c.done)(c.status, c.status.ok() ? &response : nullptr);
      response.Clear();
    }
  }

 private:
  struct Completion {
    absl::Status status;
    Reply reply;
    ExpertTransport::Done* done = nullptr;
  };
  Send send_;
  Read read_;
  Poll poll_;
  std::deque<ExpertTransport::Done> dones_;  // stable addresses; touched by this thread only
  int pending_ = 0;                          // started and not yet run; this thread only
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<Completion> completed_;  // guarded by mu_
  std::atomic<int> queued_{0};        // completed_.size(), read without the lock
};

// Replies that arrive as responses already (the in-process fake).
using ResponseExchange = QueuedExchange<std::unique_ptr<v1::ComputeResponse>>;
absl::Status TakeResponse(std::unique_ptr<v1::ComputeResponse>& reply, v1::ComputeResponse* response);

struct GrpcTransportOptions {
  int max_message_bytes = 256 << 20;
};

// One channel per endpoint, created on first use. Endpoints are gRPC targets:
// "host:port", or a DNS name ("expert-0.experts.ns.svc:50051", Kubernetes headless
// services) which gRPC's resolver looks up and re-resolves on reconnect. An exchange
// uses gRPC's async API on a completion queue of its own, which Wait polls.
class GrpcExpertTransport : public ExpertTransport {
 public:
  explicit GrpcExpertTransport(GrpcTransportOptions options = {}) : options_(options) {}

  std::unique_ptr<Exchange> NewExchange(Clock::time_point deadline) override;
  absl::Status Info(const std::string& endpoint, Clock::time_point deadline,
                    v1::InfoResponse* response) override;

  v1::ExpertService::Stub* StubFor(const std::string& endpoint);

 private:
  const GrpcTransportOptions options_;
  std::mutex mu_;
  std::unordered_map<std::string, std::unique_ptr<v1::ExpertService::Stub>> stubs_;  // guarded by mu_
};

}  // namespace moemesh
