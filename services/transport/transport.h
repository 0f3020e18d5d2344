// ExpertTransport: the token data path from a router to the expert services, one
// interface for gRPC (grpc_transport.h), UCX (ucx/) and the in-process fakes of unit tests.
//
// One MoE layer call opens an Exchange, builds and sends one request per destination
// service, does other work while they fly, then Waits; every reply's `done` runs on the
// waiting thread, inside Wait (docs/architecture.md, "The mesh").
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"
#include "expert_service.pb.h"
#include "services/base/tensor.h"

namespace moemesh {

// Each batch's row bytes of a ComputeRequest whose rows travelled outside the message (the
// request's own rows data is then empty): the UCX data plane's segments. Empty: the rows
// are in the message.
using RowSegments = std::vector<absl::string_view>;

// A ComputeRequest under construction, in the memory its transport sends from: the caller
// writes each batch's rows once, straight to where they leave (a UCX registered buffer; the
// protobuf's own bytes field over gRPC). Used by one thread.
class OutgoingRequest {
 public:
  virtual ~OutgoingRequest() = default;
  // Everything but the rows (layer, epoch, output dtype); batches go only through AddRows.
  v1::ComputeRequest& request() { return request_; }
  // Adds a batch of rows of `dtype` and `shape` for `expert`; returns where its
  // numel * DTypeSize(dtype) bytes are to be written (valid until the next AddRows or the
  // send), or nullptr when there is no memory for them.
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
    // Waits for the calls still in flight (their `done` runs) before it goes.
    virtual ~Exchange() = default;
    // Sends `request` to `endpoint` without waiting for the reply. `done` runs exactly
    // once, inside Wait, with the reply or the call's error: UNAVAILABLE for an unreachable
    // service, DEADLINE_EXCEEDED past the exchange's deadline, the service's own error.
    virtual void Start(const std::string& endpoint, std::unique_ptr<v1::ComputeRequest> request,
                       Done done) = 0;
    // A request to fill and Send, rows written in place. `row_bytes` and `batches` are
    // what it will hold (more is allowed, at the cost of a copy).
    virtual std::unique_ptr<OutgoingRequest> NewRequest(size_t row_bytes, int batches);
    // Sends a request from NewRequest, as Start does.
    virtual void Send(const std::string& endpoint, std::unique_ptr<OutgoingRequest> request,
                      Done done);
    // Returns when every started call has completed and its `done` has run.
    virtual void Wait() = 0;
    // Wait that may return early: true when no call is in flight any more; false once
    // `until` has passed or `enough()` (checked before waiting for each completion) holds
    // with calls still in flight. The default cannot stop early: it Waits.
    virtual bool WaitUntil(Clock::time_point until, const std::function<bool()>& enough);
    // Ends every call still in flight: each one's `done` runs with CANCELLED (at once, or
    // inside the next Wait) and a reply that comes later is dropped. gRPC cancels the call
    // on the wire; UCX cannot recall a request (the service computes it, its reply is
    // dropped). The default does nothing.
    virtual void CancelAll() {}
  };

  virtual ~ExpertTransport() = default;
  // Every call of the exchange ends by `deadline`. Thread-safe.
  virtual std::unique_ptr<Exchange> NewExchange(Clock::time_point deadline) = 0;
  // Blocking Info call (readiness and placement checks, the UCX worker address and
  // credential). Thread-safe.
  virtual absl::Status Info(const std::string& endpoint, const v1::InfoRequest& request,
                            Clock::time_point deadline, v1::InfoResponse* response) = 0;
};

}  // namespace moemesh
