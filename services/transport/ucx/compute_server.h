// UcxComputeServer: the expert service's side of the UCX data plane (docs/architecture.md,
// "UCX data plane"). Receives Compute requests from UcxExpertTransports (client.h) as UCP
// active messages and answers each with `compute`, run on `threads` threads of its own, or
// on the worker thread for a request of up to kUcxInlineBytes when those are idle.
//
// Threads: the accessors are thread-safe; `compute` runs on those threads, several at
// once. Errors go back as the reply's status: `compute`'s own; INVALID_ARGUMENT for a
// request that does not parse; RESOURCE_EXHAUSTED over max_message_bytes or without
// buffers. A request whose client cannot be answered (unknown, or gone) is dropped.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "expert_service.pb.h"
#include "services/base/mutex.h"
#include "services/transport/transport.h"
#include "services/transport/ucx/buffer_pool.h"
#include "services/transport/ucx/protocol.h"
#include "services/transport/ucx/worker_thread.h"

namespace moemesh {

class UcxComputeServer {
 public:
  // Computes a parsed request whose row bytes are in `rows` (or, when it is empty, in the
  // request); returns the status and fills the response.
  using Compute = std::function<absl::Status(const v1::ComputeRequest&, const RowSegments& rows,
                                             v1::ComputeResponse*)>;

  // `spin`: how long the worker thread polls after its last message before it sleeps.
  static absl::StatusOr<std::unique_ptr<UcxComputeServer>> Create(
      Compute compute, int threads, int max_message_bytes,
      std::chrono::microseconds spin = kUcxDefaultSpin);
  // Stops taking requests, waits for the ones being computed, then stops UCX.
  ~UcxComputeServer();

  const std::string& worker_address() const { return worker_->address(); }
  // A credential for one client (ucx::kCredentialBytes), which Info hands out over the
  // authenticated control plane: a client's hello must carry one, or it is refused and its
  // requests are dropped before their data is read. The last kMaxCredentials stay valid.
  std::string IssueCredential() ABSL_LOCKS_EXCLUDED(credentials_mu_);
  static constexpr size_t kMaxCredentials = 1 << 16;
  // Hellos refused (no valid credential), and requests dropped unread because their client
  // was never accepted.
  int64_t refused_hellos() const { return refused_hellos_.load(); }
  int64_t refused_requests() const { return refused_requests_.load(); }
  // Requests received and not yet answered.
  int64_t in_flight() const { return in_flight_.load(); }
  // Clients connected now (each said hello and its endpoint has not failed).
  int64_t clients() const { return clients_count_.load(); }
  // Requests dropped because their client could not be answered (unknown or gone).
  int64_t dropped() const { return dropped_.load(); }
  // Requests computed on the worker thread (small, compute threads idle); for tests.
  int64_t computed_inline() const { return computed_inline_.load(); }

 private:
  struct Client;     // a router connected back to; guarded by the worker's lock, as clients_
  struct Callbacks;  // UCX's callbacks into this server (compute_server.cc: UCX types)
  struct Job {
    uint64_t client = 0;
    uint64_t id = 0;
    uint32_t format = 0;
    UcxBufferPtr payload;
  };
  struct Answer {
    uint64_t client = 0;
    uint64_t id = 0;
    int32_t code = 0;
    UcxBufferPtr payload;  // the serialized response, or the error message
  };

  UcxComputeServer() = default;
  // A buffer for a request of `length` bytes; RESOURCE_EXHAUSTED over the limit or
  // without memory.
  absl::StatusOr<UcxBufferPtr> TakeRequestBuffer(size_t length);
  // Answers a request that is not computed with `status` (from posted work: the AM
  // callback cannot send).
  void Refuse(uint64_t client, uint64_t id, const absl::Status& status);
  // Queues a received request for the compute threads, or (small, `may_inline`, those
  // idle) for the worker thread.
  void Enqueue(Job job, bool may_inline = false) ABSL_LOCKS_EXCLUDED(mu_);
  void ComputeLoop() ABSL_LOCKS_EXCLUDED(mu_);
  // Computes one request (any thread), with the caller's reusable messages; Send sends the
  // answer.
  Answer Serve(Job job, v1::ComputeRequest& request, v1::ComputeResponse& response,
               RowSegments& rows);
  // The reply to `job`: the serialized response, or the error (no memory for the reply
  // is an error too).
  Answer Encode(const Job& job, const absl::Status& status, const v1::ComputeResponse& response);
  void Send(Answer answer) ABSL_LOCKS_EXCLUDED(worker_->mutex());
  // The worker thread, after a round of progress: computes the request queued for it.
  void ServeInline() ABSL_LOCKS_EXCLUDED(mu_, worker_->mutex());
  // The worker thread, at each request: the gaps between the last three.
  void Arrived();

  // Whether `credential` (ucx::kCredentialBytes) is one IssueCredential gave out.
  bool CheckCredential(const uint8_t* credential) ABSL_LOCKS_EXCLUDED(credentials_mu_);
  // Under the worker's lock (AM callbacks): marks `client` as accepted (its hello carried a
  // valid credential), before its endpoint back exists.
  void Accept(uint64_t client) ABSL_EXCLUSIVE_LOCKS_REQUIRED(worker_->mutex());
  // Whether requests from `client` are taken.
  bool Accepted(uint64_t client) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(worker_->mutex());
  // Under the worker's lock.
  void Hello(uint64_t client, std::string address) ABSL_EXCLUSIVE_LOCKS_REQUIRED(worker_->mutex());
  // Sends a reply to its client, or drops it; `deferred`: queued behind posted work once
  // already (a new client's hello).
  void Reply(uint64_t client, uint64_t id, int32_t code, UcxBufferPtr payload,
             bool deferred = false) ABSL_EXCLUSIVE_LOCKS_REQUIRED(worker_->mutex());
  void SendReply(const Client& client, uint64_t id, int32_t code, UcxBufferPtr payload)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(worker_->mutex());

  Compute compute_;
  int max_message_bytes_ = 0;
  std::unique_ptr<UcxWorkerThread> worker_;
  std::atomic<int64_t> in_flight_{0};
  std::atomic<int64_t> clients_count_{0};
  std::atomic<int64_t> dropped_{0};
  std::atomic<int64_t> computed_inline_{0};
  std::atomic<int64_t> refused_hellos_{0};
  std::atomic<int64_t> refused_requests_{0};
  // Issued credentials: id -> secret, and the ids in the order issued (the oldest go).
  Mutex credentials_mu_;
  std::unordered_map<std::string, std::string> credentials_ ABSL_GUARDED_BY(credentials_mu_);
  std::deque<std::string> credential_order_ ABSL_GUARDED_BY(credentials_mu_);
  std::atomic<bool> closing_{false};  // set by the destructor: failures are expected

  Mutex mu_ ABSL_ACQUIRED_AFTER(worker_->mutex());
  CondVar cv_;  // jobs_ or stop_, for the compute threads
  std::deque<Job> jobs_ ABSL_GUARDED_BY(mu_);
  int busy_ ABSL_GUARDED_BY(mu_) = 0;                 // compute threads computing
  std::atomic<int> working_{0};                       // jobs_.size() + busy_, read without the lock
  std::deque<Job> inline_jobs_ ABSL_GUARDED_BY(mu_);  // for the worker thread
  std::atomic<bool> has_inline_{false};
  bool stop_ ABSL_GUARDED_BY(mu_) = false;
  std::vector<std::thread> threads_;

  // The worker thread's.
  std::chrono::steady_clock::time_point last_arrival_{};
  std::chrono::steady_clock::duration gaps_[2] = {};
  v1::ComputeRequest inline_request_;
  v1::ComputeResponse inline_response_;
  RowSegments inline_rows_;

  std::unordered_map<uint64_t, std::unique_ptr<Client>> clients_ ABSL_GUARDED_BY(worker_->mutex());
};

}  // namespace moemesh
