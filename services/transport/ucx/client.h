// UcxExpertTransport: the router's side of the UCX data plane (docs/architecture.md, "UCX
// data plane"), an ExpertTransport whose Compute calls go to UcxComputeServers
// (compute_server.h) as UCP active messages. Info, and the worker address inside it that
// each service is connected to on first use, goes over `control`.
//
// Threads: all of it is thread-safe. A call's errors, as over gRPC: UNAVAILABLE for a
// service without a UCX data plane or that cannot be reached, and for every call in
// flight to one whose connection fails (reconnected, its address fetched again through
// Info, on the next call) or, where UCX cannot report a dead peer, whose control plane
// says it is gone or restarted; DEADLINE_EXCEEDED for no reply by the deadline (a late
// reply is dropped); RESOURCE_EXHAUSTED over max_message_bytes or without buffers; a
// failed Info's own error; the service's own status.
#pragma once

#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <unordered_map>
#include <utility>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "services/base/mutex.h"
#include "services/transport/transport.h"
#include "services/transport/ucx/buffer_pool.h"
#include "services/transport/ucx/protocol.h"
#include "services/transport/ucx/worker_thread.h"

// UCX types, kept out of this header.
typedef struct ucp_ep* ucp_ep_h;

namespace moemesh {

class UcxExpertTransport : public ExpertTransport {
 public:
  // `spin`: how long a thread waiting in an exchange polls for its replies.
  static absl::StatusOr<std::shared_ptr<UcxExpertTransport>> Create(
      std::shared_ptr<ExpertTransport> control, int max_message_bytes = 256 << 20,
      std::chrono::microseconds spin = kUcxDefaultSpin);
  // Ends the calls in flight with CANCELLED and closes the connections.
  ~UcxExpertTransport() override;

  std::unique_ptr<Exchange> NewExchange(Clock::time_point deadline) override;
  absl::Status Info(const std::string& endpoint, const v1::InfoRequest& request,
                    Clock::time_point deadline, v1::InfoResponse* response) override;

  // The bytes of a call's serialized reply (on OK) or the call's error. Runs once:
  // holding the worker's lock, or on the calling thread for an error found before
  // sending. It must only hand the result on (no UCX calls, no blocking).
  using Complete = std::function<void(absl::Status, UcxBufferPtr reply)>;
  // Sends one serialized request (kPlain).
  void Send(const std::string& endpoint, UcxBufferPtr request, Clock::time_point deadline,
            Complete complete);
  // Sends a request as the exchanges do: its row bytes are moved out (no copy) and go as
  // segments of their own after the serialized rest, gathered by UCX (iov), so the bulk
  // is never serialized here nor parsed on the service.
  void SendRequest(const std::string& endpoint, std::unique_ptr<v1::ComputeRequest> request,
                   Clock::time_point deadline, Complete complete);
  // A request built in a registered buffer (what the exchanges' NewRequest gives): each
  // batch's rows written by the caller where they are sent from (the segmented format,
  // its head filled in at the send), so they are copied neither into a protobuf nor
  // into a send buffer. A plain OutgoingRequest when no buffer can be had (it is then
  // sent as SendRequest sends a protobuf).
  std::unique_ptr<OutgoingRequest> NewRequest(size_t row_bytes, int batches);
  // Sends `size` bytes of a serialized request where they are, in memory of type
  // `memory_type` (a ucs_memory_type_t: host, or CUDA where cuda_direct()), holding
  // `keep` until UCX is done reading them (which may be after `complete`, when the call
  // ends early). See services/transport/ucx/device.h.
  void SendInPlace(const std::string& endpoint, std::shared_ptr<const void> keep, const void* data,
                   size_t size, int memory_type, Clock::time_point deadline, Complete complete);
  // Whether UCX here reads CUDA device memory itself (a CUDA-enabled UCX: GPUDirect RDMA
  // on InfiniBand, cuda_ipc/cuda_copy inside a node). Debian's UCX does not.
  bool cuda_direct() const;
  UcxBufferPool& buffers() { return worker_->buffers(); }

  // Calls in flight (sent, no reply or error yet); for tests.
  int64_t in_flight() const { return in_flight_.load(); }
  // Control-plane probes of services whose transport cannot report failure; for tests.
  int64_t probes() const { return probes_.load(); }
  // Waits that polled the worker (UcxWorkerThread::Poll); for tests.
  int64_t polls() const { return worker_->polls(); }

 private:
  struct Pending;    // a call in flight
  struct Peer;       // a service connected to
  struct Callbacks;  // UCX's callbacks into this transport (client.cc: UCX types)

  UcxExpertTransport(std::shared_ptr<ExpertTransport> control, int max_message_bytes,
                     std::chrono::microseconds spin);
  void SendRequest(const std::string& endpoint, std::unique_ptr<v1::ComputeRequest> request,
                   Clock::time_point deadline, bool polled, Complete complete);
  void SendBuilt(const std::string& endpoint, std::unique_ptr<OutgoingRequest> request,
                 Clock::time_point deadline, bool polled, Complete complete);
  // Looks up the endpoint's worker address (Info on first use); false after `complete`
  // has run with the error.
  bool Resolve(const std::string& endpoint, Clock::time_point deadline, const Complete& complete)
      ABSL_LOCKS_EXCLUDED(addresses_mu_);
  // A call of `size` bytes to `endpoint`, checked against the size limit and resolved
  // (`complete` moved into it); nullptr after `complete` has run with the error.
  std::shared_ptr<Pending> Prepare(const std::string& endpoint, size_t size,
                                   Clock::time_point deadline, Complete& complete);
  // Numbers the call and sends it from this thread, holding the worker's lock.
  void Start(std::shared_ptr<Pending> p) ABSL_LOCKS_EXCLUDED(worker_->mutex());

  // The steps of a send, under the worker's lock.
  void StartOnWorker(std::shared_ptr<Pending> p) ABSL_EXCLUSIVE_LOCKS_REQUIRED(worker_->mutex());
  // Records the call in flight (and makes the worker thread watch for it if its caller
  // does not poll).
  void AddPending(const std::shared_ptr<Pending>& p)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(worker_->mutex());
  // The connected peer for `endpoint` (connecting and saying hello first if need be), or
  // nullptr and `*error`.
  Peer* Connect(const std::string& endpoint, std::string* error)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(worker_->mutex()) ABSL_LOCKS_EXCLUDED(addresses_mu_);
  // The memory handle of what `p` sends from: its payload's, or that of the one buffer its
  // head and segments are packed into where the peer does not gather an iov.
  ucp_mem_h PackOrRegister(Pending& p, const Peer& peer)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(worker_->mutex());
  // Whether `p` goes as an iov (its segments gathered, or a large payload over shared
  // memory), filling p.iov.
  static bool DescribeAsIov(Pending& p, const Peer& peer);
  void FailPeer(Peer* peer, ucp_ep_h ep, const absl::Status& status)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(worker_->mutex()) ABSL_LOCKS_EXCLUDED(addresses_mu_);
  // Ends a call (at most once: later ones for the same id are ignored).
  void Finish(uint64_t id, absl::Status status, UcxBufferPtr reply)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(worker_->mutex());
  void OnReply(uint64_t id, int32_t code, UcxBufferPtr data)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(worker_->mutex());
  // The worker thread's idle hook: milliseconds until it must run again (-1: no call in
  // flight). Its steps: ending the calls past their deadline, and asking the prober about
  // services UCX cannot watch that calls have waited on; each returns when it is due next.
  int OnIdle() ABSL_EXCLUSIVE_LOCKS_REQUIRED(worker_->mutex()) ABSL_LOCKS_EXCLUDED(probe_mu_);
  Clock::time_point EndExpired(Clock::time_point now)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(worker_->mutex());
  Clock::time_point AskProbes(Clock::time_point now) ABSL_EXCLUSIVE_LOCKS_REQUIRED(worker_->mutex())
      ABSL_LOCKS_EXCLUDED(probe_mu_);
  // The prober thread: asks the control plane about services UCX cannot watch.
  void ProbeLoop() ABSL_LOCKS_EXCLUDED(probe_mu_);

  const std::shared_ptr<ExpertTransport> control_;
  const int max_message_bytes_;
  const std::chrono::microseconds spin_;
  const uint64_t client_id_;
  std::unique_ptr<UcxWorkerThread> worker_;
  std::atomic<uint64_t> next_id_{1};
  std::atomic<int64_t> in_flight_{0};
  std::atomic<int64_t> probes_{0};
  std::atomic<int64_t> unpolled_{0};  // calls in flight whose caller does not poll
  // How long the last two polled calls took, sent to reply (written under the worker's
  // lock); waiting threads poll only if one of them was shorter than the spin.
  std::atomic<int64_t> latency_ns_[2] = {0, 0};
  std::atomic<bool> closing_{false};  // set by the destructor: failures are expected

  // Worker addresses by endpoint, from Info; dropped when the peer fails.
  Mutex addresses_mu_ ABSL_ACQUIRED_AFTER(worker_->mutex());
  // Each endpoint's worker address and UCX credential, from Info.
  struct Resolved {
    std::string address;
    std::string credential;
  };
  std::unordered_map<std::string, Resolved> addresses_ ABSL_GUARDED_BY(addresses_mu_);

  // Probes asked for by the worker thread: (endpoint, the address it is connected to).
  Mutex probe_mu_ ABSL_ACQUIRED_AFTER(worker_->mutex());
  CondVar probe_cv_;
  std::deque<std::pair<std::string, std::string>> probe_queue_ ABSL_GUARDED_BY(probe_mu_);
  bool probe_stop_ ABSL_GUARDED_BY(probe_mu_) = false;
  std::thread prober_;

  std::unordered_map<std::string, std::unique_ptr<Peer>> peers_ ABSL_GUARDED_BY(worker_->mutex());
  std::unordered_map<uint64_t, std::shared_ptr<Pending>> pending_ ABSL_GUARDED_BY(worker_->mutex());
};

}  // namespace moemesh
