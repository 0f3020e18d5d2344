// The UCX data plane: ExpertService.Compute carried by UCP active messages, so the same
// code moves token rows over RDMA (InfiniBand/RoCE), shared memory or TCP, whichever UCX
// selects; gRPC stays the control plane (Info carries each service's UCX worker address)
// and the portable fallback. UCX's own environment (UCX_TLS, UCX_NET_DEVICES, ...) is
// passed through untouched.
//
// Each side runs one UCP worker on a thread of its own (UcxWorkerThread): every UCX call
// happens there; other threads hand it work, and it sleeps in epoll on the worker's
// event fd when there is nothing to do (no busy polling). Messages:
//   request  AM 1, header {magic, id}, data = serialized v1::ComputeRequest, sent with
//            UCP_AM_SEND_FLAG_REPLY. Sends are eager (fragmented) at every size for now:
//            rendezvous stalled with UCX 1.13 here; receiving it is written and kept;
//   reply    AM 2 on the request's reply endpoint, header {magic, id, status code},
//            data = serialized v1::ComputeResponse, or the error message.
//
// Failures, as over gRPC: a service whose endpoint fails (dead peer, reset connection)
// gives UNAVAILABLE for every call in flight to it and is reconnected (its worker
// address fetched again through Info) on the next call; a call with no reply by its
// deadline gives DEADLINE_EXCEEDED (a hung peer). A reply is delivered at most once: a
// late one, for a call already ended, is dropped.
//
// Memory: payloads are host memory only; the CUDA-memory path is not written yet.
// Status: in progress (issue 6); not yet in ctest.
#pragma once

#include <atomic>
#include <condition_variable>
#include <chrono>
#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "services/transport.h"

// UCX types, kept out of this header.
typedef struct ucp_context* ucp_context_h;
typedef struct ucp_worker* ucp_worker_h;
typedef struct ucp_ep* ucp_ep_h;

namespace moemesh {

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
  // Runs `fn` on the worker thread, soon. Thread-safe.
  void Post(std::function<void()> fn);
  // Called on the worker thread after each round of progress: milliseconds until it must
  // run again (-1: only when woken). Set before the first Post.
  void SetIdleHook(std::function<int()> hook) { idle_hook_ = std::move(hook); }

  ucp_worker_h worker() const { return worker_; }
  ucp_context_h context() const { return context_; }
  // The worker's address, for a peer's ucp_ep_create.
  const std::string& address() const { return address_; }
  bool on_worker_thread() const { return std::this_thread::get_id() == thread_.get_id(); }

 private:
  UcxWorkerThread() = default;
  void Loop();

  ucp_context_h context_ = nullptr;
  ucp_worker_h worker_ = nullptr;
  std::string address_;
  int epoll_fd_ = -1, event_fd_ = -1, worker_fd_ = -1;
  std::function<int()> idle_hook_;
  std::mutex mu_;
  std::deque<std::function<void()>> posted_;  // guarded by mu_
  bool stop_ = false;                         // guarded by mu_
  std::thread thread_;
};

// The router's side: an ExpertTransport whose Compute calls go over UCX. Info (and the
// worker address inside it) goes over `control`.
class UcxExpertTransport : public ExpertTransport {
 public:
  static absl::StatusOr<std::shared_ptr<UcxExpertTransport>> Create(
      std::shared_ptr<ExpertTransport> control, int max_message_bytes = 256 << 20);
  ~UcxExpertTransport() override;

  std::unique_ptr<Exchange> NewExchange(Clock::time_point deadline) override;
  absl::Status Info(const std::string& endpoint, Clock::time_point deadline,
                    v1::InfoResponse* response) override;

  // Calls in flight (sent, no reply or error yet); for tests.
  int64_t in_flight() const { return in_flight_.load(); }

 private:
  struct Pending;
  struct Peer;
  UcxExpertTransport(std::shared_ptr<ExpertTransport> control, int max_message_bytes);

  using Complete = std::function<void(absl::Status, std::unique_ptr<v1::ComputeResponse>)>;
  void Send(const std::string& endpoint, std::unique_ptr<v1::ComputeRequest> request,
            Clock::time_point deadline, Complete complete);
  // Worker-thread side.
  void StartOnWorker(uint64_t id, std::shared_ptr<Pending> pending);
  ucp_ep_h Connect(const std::string& endpoint, std::string* error);
  void FailPeer(const std::string& endpoint, const absl::Status& status);
  void Finish(uint64_t id, absl::Status status, std::unique_ptr<v1::ComputeResponse> response);
  int ExpireDeadlines();
  void OnReply(uint64_t id, int32_t code, const char* data, size_t length);
  friend struct UcxCallbacks;

  const std::shared_ptr<ExpertTransport> control_;
  const int max_message_bytes_;
  std::unique_ptr<UcxWorkerThread> worker_;
  std::atomic<uint64_t> next_id_{1};
  std::atomic<int64_t> in_flight_{0};
  std::atomic<bool> closing_{false};  // set by the destructor: failures are expected

  // Worker addresses by endpoint, from Info; dropped when the peer fails.
  std::mutex addresses_mu_;
  std::unordered_map<std::string, std::string> addresses_;  // guarded by addresses_mu_

  // Worker-thread state only.
  std::unordered_map<std::string, std::unique_ptr<Peer>> peers_;
  std::unordered_map<uint64_t, std::shared_ptr<Pending>> pending_;
};

// The expert service's side: receives Compute requests over UCX and answers them with
// `compute`, run on `threads` threads of its own (the worker thread never computes).
class UcxComputeServer {
 public:
  // Parses the request, computes, and returns the status and the response.
  using Compute = std::function<absl::Status(const v1::ComputeRequest&, v1::ComputeResponse*)>;

  static absl::StatusOr<std::unique_ptr<UcxComputeServer>> Create(Compute compute, int threads,
                                                                  int max_message_bytes);
  // Stops taking requests, waits for the ones being computed, then stops UCX.
  ~UcxComputeServer();

  const std::string& worker_address() const { return worker_->address(); }
  // Requests received and not yet answered.
  int64_t in_flight() const { return in_flight_.load(); }

 private:
  struct Payload {
    std::unique_ptr<char[]> data;
    size_t size = 0;
  };
  struct Job {
    ucp_ep_h reply_ep = nullptr;
    uint64_t id = 0;
    Payload payload;
  };
  UcxComputeServer() = default;
  friend struct UcxCallbacks;
  void Enqueue(Job job);
  void ComputeLoop();
  void Reply(ucp_ep_h ep, uint64_t id, int32_t code, std::string payload);

  Compute compute_;
  int max_message_bytes_ = 0;
  std::unique_ptr<UcxWorkerThread> worker_;
  std::atomic<int64_t> in_flight_{0};
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<Job> jobs_;  // guarded by mu_
  bool stop_ = false;     // guarded by mu_
  std::vector<std::thread> threads_;
};

}  // namespace moemesh
