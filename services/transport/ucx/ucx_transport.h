// The UCX data plane: ExpertService.Compute carried by UCP active messages, so the same
// code moves token rows over RDMA (InfiniBand/RoCE), shared memory or TCP, whichever UCX
// selects; gRPC stays the control plane (Info carries each service's UCX worker address)
// and the portable fallback. UCX's own environment (UCX_TLS, UCX_NET_DEVICES, ...) is
// passed through untouched.
//
// Each side runs one UCP worker (UcxWorkerThread), UCS_THREAD_MODE_SERIALIZED under one
// lock. Its own thread runs progress, deadlines and posted work, and sleeps in epoll on
// the worker's event fd when there is nothing to do (after a bounded spin, below); requests and
// replies are sent straight from the thread that has them (the router's caller, the
// service's compute thread), holding the lock. Messages (UCP active messages):
//   hello    AM 3, client -> service, once per connection: header {magic, client id},
//            data = the client's worker address. The service connects back with an
//            endpoint of its own (with a failure handler), on which it replies.
//   request  AM 1, header {magic, call id, client id, format}, data = the request with
//            its row bytes as segments of their own after the rest (never serialized,
//            never parsed; the service computes on them where they land), or a plain
//            serialized v1::ComputeRequest. The router builds a request in place
//            (NewRequest: each batch's rows converted straight into a registered buffer,
//            the head written in front of them at the send: one buffer, no copy); a
//            request given as a protobuf has its rows moved out and gathered by UCX from
//            an iov (or packed into one buffer over TCP). UCX picks eager or rendezvous
//            by size (UCX_RNDV_THRESH): large payloads move by rendezvous straight into a
//            registered buffer. Over shared memory they are described as an iov, which
//            UCX 1.13 moves by its pipelined copy rather than a cma read (faster in this
//            request/reply flow, see StartOnWorker). Over TCP, UCX 1.13 has no zero-copy
//            rendezvous for endpoints with peer error handling (which detecting a dead
//            peer needs): the receiving side copies the data out of UCX's buffers
//            (ucx_perftest -e measures the same).
//   reply    AM 2, header {magic, call id, status code}, data = serialized
//            v1::ComputeResponse, or the error message.
// Payloads live in registered buffers taken from a pool (UcxBufferPool) and reused: each
// is registered with UCX once (ucp_mem_map) and its handle passed with every send and
// receive, so no call pays for registration or page faults.
//
// Polling, bounded: a sleeping thread costs a wakeup per message (tens of µs on a VM,
// far more than UCX's own latency over shared memory or RDMA). So a thread that waits for
// a reply runs the worker's progress itself for up to `spin` before it sleeps (the worker
// thread then leaves the worker unarmed: the peer need not signal, nobody is woken), and
// a service's worker thread keeps polling for `spin` after its last message before it
// arms and sleeps, and computes a small request itself when its compute threads are idle
// (no hand-off). A burst of small calls wakes no thread; an idle process does not spin.
// Only where it pays: the router polls for small calls (up to kUcxInlineBytes) while one
// of the last two took less than `spin`; the service polls on while its compute threads
// are idle and one of the last two gaps between requests was shorter than `spin`.
//
// Failures, as over gRPC: a service whose endpoint fails (dead peer, reset connection)
// gives UNAVAILABLE for every call in flight to it and is reconnected (its worker
// address fetched again through Info) on the next call; a call with no reply by its
// deadline gives DEADLINE_EXCEEDED (a hung peer). Transports that cannot detect a dead
// peer (UCX 1.13's shared memory) are watched through the control plane instead: while
// calls wait on such a service, Info is asked every 100 ms; a refused connection or a
// new worker address (a restart) fails those calls with UNAVAILABLE at once. A reply
// is delivered at most once: a late one, for a call already ended, is dropped.
//
// Device memory: see services/transport/ucx/device.h (CUDA buffers sent directly where UCX
// supports them, staged through pinned host memory otherwise).
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "services/transport/transport.h"

// UCX types, kept out of this header.
typedef struct ucp_context* ucp_context_h;
typedef struct ucp_worker* ucp_worker_h;
typedef struct ucp_ep* ucp_ep_h;
typedef struct ucp_mem* ucp_mem_h;

namespace moemesh {

class UcxBufferPool;

// How long a waiting thread (or an idle service worker) polls before it sleeps; 0: never.
constexpr std::chrono::microseconds kUcxDefaultSpin{1000};
// Requests up to this size are computed on the service's worker thread when its compute
// threads are idle.
constexpr size_t kUcxInlineBytes = 64 << 10;

// Each batch's row bytes of a request whose rows travelled outside the message (the
// request's own rows data is then empty); empty: the rows are in the message.
using UcxRows = std::vector<absl::string_view>;

// A payload buffer from a UcxBufferPool: `size` bytes used of `capacity`. Returned to
// its pool when the handle goes.
struct UcxBuffer {
  char* data = nullptr;
  size_t size = 0;
  size_t capacity = 0;
  ucp_mem_h memh = nullptr;  // set under the worker's lock, the first time UCX needs it
  bool pinned = false;       // page-locked for CUDA copies (services/transport/ucx/device.h)
  int size_class = 0;
  std::shared_ptr<UcxBufferPool> pool;
};
struct UcxBufferReturn {
  void operator()(UcxBuffer* b) const;
};
using UcxBufferPtr = std::unique_ptr<UcxBuffer, UcxBufferReturn>;

// Page-aligned, pre-faulted buffers in power-of-two size classes, kept for reuse (as
// many per class as were ever in use at once, up to 1 GiB in all) and registered with
// the context once each. Take and return from any thread; Register holding the worker's lock (UcxWorkerThread::RunLocked or its thread).
class UcxBufferPool : public std::enable_shared_from_this<UcxBufferPool> {
 public:
  explicit UcxBufferPool(ucp_context_h context) : context_(context) {}
  ~UcxBufferPool();
  UcxBufferPtr Take(size_t size);
  // The buffer's UCX memory handle, registering it the first time (nullptr if
  // registration failed: UCX then registers per call).
  ucp_mem_h Register(UcxBuffer& buffer);
  // Unregisters every kept buffer (before the context goes); later returns just free.
  void Close();
  // Undoes `pinned` before a buffer's memory goes (set by services/transport/ucx/device.h).
  void SetUnpin(std::function<void(UcxBuffer*)> unpin) {
    std::lock_guard<std::mutex> lock(mu_);
    unpin_ = std::move(unpin);
  }
  // How surplus registered buffers reach the worker thread to be unregistered.
  void SetPoster(std::function<void(std::function<void()>)> post) {
    std::lock_guard<std::mutex> lock(mu_);
    poster_ = std::move(post);
  }
  // Buffers registered so far (each once), and kept for reuse now; for tests.
  int64_t registrations() const { return registrations_.load(); }
  int64_t kept() const;

 private:
  friend struct UcxBufferReturn;
  void Return(UcxBuffer* b);
  void Free(UcxBuffer* b);

  const ucp_context_h context_;
  std::atomic<int64_t> registrations_{0};
  mutable std::mutex mu_;
  struct Class {
    std::vector<UcxBuffer*> free;  // kept for reuse
    size_t out = 0;                // taken and not yet returned
    size_t high = 0;               // the most ever out at once
  };
  std::vector<Class> classes_;  // by size class; guarded by mu_
  size_t kept_bytes_ = 0;       // in the free lists; guarded by mu_
  std::set<UcxBuffer*> registered_;            // guarded by mu_
  bool closed_ = false;                        // guarded by mu_
  std::function<void(std::function<void()>)> poster_;  // guarded by mu_
  std::function<void(UcxBuffer*)> unpin_;               // guarded by mu_
};

// Whether a UCX_TLS value (nullptr: unset) leaves UCX's shared-memory transports in:
// unset, "all", or a list naming posix, sysv or their aliases (sm, shm, mm); for an
// exclusion list ("^..."), one that names none of them.
bool UcxTlsMayUseSharedMemory(const char* tls);

// One UCP context and worker, driven by a thread of their own.
class UcxWorkerThread {
 public:
  // INTERNAL naming the UCX call that failed (no usable transport, bad UCX_TLS, ...).
  static absl::StatusOr<std::unique_ptr<UcxWorkerThread>> Create(const std::string& name);
  // Stops the thread (after the posted work has run), then destroys worker and context.
  ~UcxWorkerThread();
  UcxWorkerThread(const UcxWorkerThread&) = delete;
  UcxWorkerThread& operator=(const UcxWorkerThread&) = delete;

  // Starts the thread; register AM handlers (on worker()) before.
  void Start();
  // Runs the posted work, a last few rounds of progress, and stops the thread. UCX
  // callbacks may still run inside; the owner tells them it is closing.
  void Stop();
  // Runs `fn` on the worker thread, soon. Thread-safe.
  void Post(std::function<void()> fn);
  // Runs `fn` now, on the calling thread, holding the worker: UCX calls made inside are
  // serialized with the worker thread's (sends go out without a hand-off).
  template <typename F>
  void RunLocked(F&& fn) {
    std::lock_guard<std::mutex> lock(ucx_mu_);
    fn();
  }
  // Makes the worker thread run a round of progress (after a send left in progress).
  void Wake();
  // Wakes the worker thread if it is parked (leaving the worker to pollers), so that it
  // looks at its SetParkWhile gate again.
  void WakeIfParked();
  // Runs the worker's progress on the calling thread until `ready()` or for `spin`,
  // whichever comes first; returns ready(). One thread polls at a time (another returns
  // at once); while one does (and for a while after, see SetParkWhile), the worker thread
  // leaves the worker unarmed, and takes over at once when a poller gives up.
  bool Poll(const std::function<bool()>& ready, std::chrono::nanoseconds spin);
  // After a round of progress that found work, the worker thread keeps polling for
  // `linger` before it sleeps. Set before Start.
  // `while_`: and only while it says so (the service: while its compute threads are idle,
  // which need the cores more).
  void SetLinger(std::chrono::nanoseconds linger, std::function<bool()> while_ = nullptr) {
    linger_ = linger;
    linger_while_ = std::move(while_);
  }
  // While callers poll (or did within the last 2 ms) the worker thread leaves the worker
  // to them, unarmed, as long as `gate` allows (the router: while no call that is not
  // polled for is in flight). Set before Start.
  void SetParkWhile(std::function<bool()> gate) { park_while_ = std::move(gate); }
  // Called on the worker thread after each round of progress, not holding the worker.
  // Set before Start.
  void SetAfterProgress(std::function<void()> fn) { after_progress_ = std::move(fn); }
  // Inside RunLocked: makes sure the worker thread runs its idle hook by `t` (it may be
  // asleep until later).
  void WakeBy(std::chrono::steady_clock::time_point t);
  // Called on the worker thread after each round of progress: milliseconds until it must
  // run again (-1: only when woken). Set before Start.
  void SetIdleHook(std::function<int()> hook) { idle_hook_ = std::move(hook); }

  ucp_worker_h worker() const { return worker_; }
  ucp_context_h context() const { return context_; }
  UcxBufferPool& buffers() { return *buffers_; }
  // The worker's address, for a peer's ucp_ep_create.
  const std::string& address() const { return address_; }
  // The memory types UCX can send from directly (bits of ucs_memory_type_t).
  uint64_t memory_types() const { return memory_types_; }
  bool on_worker_thread() const { return std::this_thread::get_id() == thread_.get_id(); }
  // Poll calls that polled so far.
  int64_t polls() const { return static_cast<int64_t>(polls_.load()); }

 private:
  UcxWorkerThread() = default;
  void Loop();
  // Holding ucx_mu_: the posted work, then a round of progress; whether either did
  // anything.
  bool RunPostedAndProgress();

  ucp_context_h context_ = nullptr;
  ucp_worker_h worker_ = nullptr;
  std::shared_ptr<UcxBufferPool> buffers_;
  std::string address_;
  uint64_t memory_types_ = 0;
  int epoll_fd_ = -1, event_fd_ = -1, worker_fd_ = -1;
  std::function<int()> idle_hook_;
  std::function<void()> after_progress_;
  std::chrono::nanoseconds linger_{0};
  std::function<bool()> linger_while_;
  // Threads in Poll now (0 or 1).
  std::atomic<int> pollers_{0};
  std::atomic<uint64_t> polls_{0};  // Poll calls so far
  std::function<bool()> park_while_;
  // Held around every UCX call on the worker: its thread's progress, callbacks and
  // posted work, and RunLocked (the worker is UCS_THREAD_MODE_SERIALIZED).
  std::mutex ucx_mu_;
  // When the worker thread will next run its idle hook unless woken; guarded by ucx_mu_.
  std::chrono::steady_clock::time_point wake_at_ = std::chrono::steady_clock::time_point::max();
  std::mutex mu_;
  std::vector<std::function<void()>> posted_;  // guarded by mu_
  std::atomic<bool> has_posted_{false};         // !posted_.empty(), read without the lock
  std::vector<std::function<void()>> running_;  // posted work being run; guarded by ucx_mu_
  bool stop_ = false;                         // guarded by mu_
  bool woken_ = false;                        // guarded by mu_
  bool parked_ = false;                       // guarded by mu_
  std::condition_variable park_cv_;           // the worker thread, while a poller polls
  std::thread thread_;
};

// The router's side: an ExpertTransport whose Compute calls go over UCX. Info (and the
// worker address inside it) goes over `control`.
class UcxExpertTransport : public ExpertTransport {
 public:
  // `spin`: how long a thread waiting in an exchange polls for its replies.
  static absl::StatusOr<std::shared_ptr<UcxExpertTransport>> Create(
      std::shared_ptr<ExpertTransport> control, int max_message_bytes = 256 << 20,
      std::chrono::microseconds spin = kUcxDefaultSpin);
  ~UcxExpertTransport() override;

  std::unique_ptr<Exchange> NewExchange(Clock::time_point deadline) override;
  absl::Status Info(const std::string& endpoint, Clock::time_point deadline,
                    v1::InfoResponse* response) override;

  // The bytes of a call's serialized reply (on OK) or the call's error. Runs once:
  // holding the worker's lock, or on the calling thread for an error found before
  // sending. It must only hand the result on (no UCX calls, no blocking).
  using Complete = std::function<void(absl::Status, UcxBufferPtr reply)>;
  // Sends one serialized request (from any thread).
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
  struct Pending;
  struct Peer;
  UcxExpertTransport(std::shared_ptr<ExpertTransport> control, int max_message_bytes,
                     std::chrono::microseconds spin);
  void SendRequest(const std::string& endpoint, std::unique_ptr<v1::ComputeRequest> request,
                   Clock::time_point deadline, bool polled, Complete complete);
  void SendBuilt(const std::string& endpoint, std::unique_ptr<OutgoingRequest> request,
                 Clock::time_point deadline, bool polled, Complete complete);
  // Looks up the endpoint's worker address (Info on first use); false after `complete`
  // has run with the error.
  bool Resolve(const std::string& endpoint, Clock::time_point deadline, const Complete& complete);
  // A call of `size` bytes to `endpoint`, checked against the size limit and resolved
  // (`complete` moved into it); nullptr after `complete` has run with the error.
  std::shared_ptr<Pending> Prepare(const std::string& endpoint, size_t size,
                                   Clock::time_point deadline, Complete& complete);
  void Start(std::shared_ptr<Pending> p);

  // Under the worker's lock.
  void StartOnWorker(std::shared_ptr<Pending> pending);
  Peer* Connect(const std::string& endpoint, std::string* error);
  void FailPeer(Peer* peer, ucp_ep_h ep, const absl::Status& status);
  void Finish(uint64_t id, absl::Status status, UcxBufferPtr reply);
  int OnIdle();
  void OnReply(uint64_t id, int32_t code, UcxBufferPtr data);
  // The prober thread.
  void ProbeLoop();
  friend struct UcxCallbacks;

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
  std::mutex addresses_mu_;
  std::unordered_map<std::string, std::string> addresses_;  // guarded by addresses_mu_

  // Probes asked for by the worker thread: (endpoint, the address it is connected to).
  std::mutex probe_mu_;
  std::condition_variable probe_cv_;
  std::deque<std::pair<std::string, std::string>> probe_queue_;  // guarded by probe_mu_
  bool probe_stop_ = false;                                      // guarded by probe_mu_
  std::thread prober_;

  // Guarded by the worker's lock (UcxWorkerThread::RunLocked or its thread).
  std::unordered_map<std::string, std::unique_ptr<Peer>> peers_;
  std::unordered_map<uint64_t, std::shared_ptr<Pending>> pending_;
};

// The expert service's side: receives Compute requests over UCX and answers them with
// `compute`, run on `threads` threads of its own, or on the worker thread for a request
// of up to kUcxInlineBytes when those are idle.
class UcxComputeServer {
 public:
  // Computes a parsed request whose row bytes are in `rows` (or, when it is empty, in the
  // request); returns the status and fills the response.
  using Compute = std::function<absl::Status(const v1::ComputeRequest&, const UcxRows& rows,
                                             v1::ComputeResponse*)>;

  // `spin`: how long the worker thread polls after its last message before it sleeps.
  static absl::StatusOr<std::unique_ptr<UcxComputeServer>> Create(
      Compute compute, int threads, int max_message_bytes,
      std::chrono::microseconds spin = kUcxDefaultSpin);
  // Stops taking requests, waits for the ones being computed, then stops UCX.
  ~UcxComputeServer();

  const std::string& worker_address() const { return worker_->address(); }
  // Requests received and not yet answered.
  int64_t in_flight() const { return in_flight_.load(); }
  // Clients connected now (each said hello and its endpoint has not failed).
  int64_t clients() const { return clients_count_.load(); }
  // Requests dropped because their client could not be answered (unknown or gone).
  int64_t dropped() const { return dropped_.load(); }
  // Requests computed on the worker thread (small, compute threads idle); for tests.
  int64_t computed_inline() const { return computed_inline_.load(); }

  // A request in the segmented format: the envelope parsed into `request`, views of the
  // row bytes (into `in`) into `rows`. INVALID_ARGUMENT naming what is wrong with a bad
  // or hostile one.
  static absl::Status ParseSegmented(const UcxBuffer& in, v1::ComputeRequest* request, UcxRows* rows);

 private:
  struct Client;
  struct Job {
    uint64_t client = 0;
    uint64_t id = 0;
    uint32_t format = 0;
    UcxBufferPtr payload;
  };

  UcxComputeServer() = default;
  friend struct UcxCallbacks;
  // Queues a received request for the compute threads, or (small, `may_inline`, those
  // idle) for the worker thread.
  void Enqueue(Job job, bool may_inline = false);
  void ComputeLoop();
  struct Answer {
    uint64_t client = 0;
    uint64_t id = 0;
    int32_t code = 0;
    UcxBufferPtr payload;  // the serialized response, or the error message
  };
  // Computes one request (any thread); Send sends the answer.
  Answer Serve(Job job, v1::ComputeRequest& request, v1::ComputeResponse& response, UcxRows& rows);
  void Send(Answer answer);
  // The worker thread, after a round of progress: computes the request queued for it.
  void ServeInline();
  // The worker thread, at each request: the gaps between the last three.
  void Arrived();
  void Hello(uint64_t client, std::string address);
  // `deferred`: queued behind posted work once already (a new client's hello).
  void Reply(uint64_t client, uint64_t id, int32_t code, UcxBufferPtr payload, bool deferred = false);

  Compute compute_;
  int max_message_bytes_ = 0;
  std::unique_ptr<UcxWorkerThread> worker_;
  std::atomic<int64_t> in_flight_{0};
  std::atomic<int64_t> clients_count_{0};
  std::atomic<int64_t> dropped_{0};
  std::atomic<int64_t> computed_inline_{0};
  std::atomic<bool> closing_{false};  // set by the destructor: failures are expected
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<Job> jobs_;  // guarded by mu_
  int busy_ = 0;          // compute threads computing; guarded by mu_
  std::atomic<int> working_{0};  // jobs_.size() + busy_, read without the lock
  std::deque<Job> inline_jobs_;  // for the worker thread; guarded by mu_
  std::atomic<bool> has_inline_{false};
  // The worker thread's.
  std::chrono::steady_clock::time_point last_arrival_{};
  std::chrono::steady_clock::duration gaps_[2] = {};
  v1::ComputeRequest inline_request_;
  v1::ComputeResponse inline_response_;
  UcxRows inline_rows_;
  bool stop_ = false;     // guarded by mu_
  std::vector<std::thread> threads_;
  // Guarded by the worker's lock (UcxWorkerThread::RunLocked or its thread).
  std::unordered_map<uint64_t, std::unique_ptr<Client>> clients_;
};

}  // namespace moemesh
