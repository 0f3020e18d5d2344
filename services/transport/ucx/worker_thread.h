// UcxWorkerThread: one UCP context and worker, driven by a thread of their own; each side
// of the UCX data plane (client.h, compute_server.h) runs one.
//
// The worker is UCS_THREAD_MODE_SERIALIZED: every UCX call on it is made holding mutex(),
// by the worker thread (progress, the UCX callbacks progress runs, posted work, the idle
// hook), by a thread in Poll, or inside RunLocked. State that only those touch is
// annotated ABSL_GUARDED_BY(worker->mutex()); UCX callbacks and posted work that touch it
// run under the lock where the analysis cannot see it, and begin with mutex().AssertHeld().
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "services/base/mutex.h"
#include "services/transport/ucx/buffer_pool.h"

// UCX types, kept out of this header.
typedef struct ucp_context* ucp_context_h;
typedef struct ucp_worker* ucp_worker_h;

namespace moemesh {

// Whether a UCX_TLS value (nullptr: unset) leaves UCX's shared-memory transports in:
// unset, "all", or a list naming posix, sysv or their aliases (sm, shm, mm); for an
// exclusion list ("^..."), one that names none of them.
bool UcxTlsMayUseSharedMemory(const char* tls);

class UcxWorkerThread {
 public:
  // INTERNAL naming the UCX call that failed (no usable transport, bad UCX_TLS, ...).
  static absl::StatusOr<std::unique_ptr<UcxWorkerThread>> Create(const std::string& name);
  // Stops the thread (after the posted work has run), then destroys worker and context.
  ~UcxWorkerThread();
  UcxWorkerThread(const UcxWorkerThread&) = delete;
  UcxWorkerThread& operator=(const UcxWorkerThread&) = delete;

  // Starts the thread; register AM handlers (on worker()) and set the hooks below before.
  void Start();
  // Runs the posted work, a last few rounds of progress, and stops the thread. UCX
  // callbacks may still run inside; the owner tells them it is closing.
  void Stop() ABSL_LOCKS_EXCLUDED(mu_, ucx_mu_);

  // Held around every UCX call on the worker (see the top of this file).
  Mutex& mutex() ABSL_LOCK_RETURNED(ucx_mu_) { return ucx_mu_; }
  // Runs `fn` now, on the calling thread, holding mutex(): UCX calls made inside are
  // serialized with the worker thread's (sends go out without a hand-off). `fn` cannot be
  // annotated: it begins with mutex().AssertHeld() where it touches guarded state.
  template <typename F>
  void RunLocked(F&& fn) ABSL_LOCKS_EXCLUDED(ucx_mu_) {
    MutexLock lock(&ucx_mu_);
    fn();
  }
  // Runs `fn` soon, holding mutex(): on the worker thread, or on a thread in Poll.
  // Thread-safe.
  void Post(std::function<void()> fn) ABSL_LOCKS_EXCLUDED(mu_);
  // Makes the worker thread run a round of progress (after a send left in progress).
  void Wake() ABSL_LOCKS_EXCLUDED(mu_);
  // Wakes the worker thread if it is parked (leaving the worker to pollers), so that it
  // looks at its SetParkWhile gate again.
  void WakeIfParked() ABSL_LOCKS_EXCLUDED(mu_);
  // Makes sure the worker thread runs its idle hook by `t` (it may be asleep until later).
  void WakeBy(std::chrono::steady_clock::time_point t) ABSL_EXCLUSIVE_LOCKS_REQUIRED(ucx_mu_);
  // Runs the worker's progress on the calling thread until `ready()` or for `spin`,
  // whichever comes first; returns ready(). One thread polls at a time (another returns
  // at once); while one does (and for a while after, see SetParkWhile), the worker thread
  // leaves the worker unarmed, and takes over at once when a poller gives up.
  bool Poll(const std::function<bool()>& ready, std::chrono::nanoseconds spin)
      ABSL_LOCKS_EXCLUDED(mu_, ucx_mu_);

  // Hooks, set before Start.
  // After a round of progress that found work, the worker thread keeps polling for
  // `linger` before it sleeps; `while_`: and only while it says so (the service: while its
  // compute threads are idle, which need the cores more).
  void SetLinger(std::chrono::nanoseconds linger, std::function<bool()> while_ = nullptr) {
    linger_ = linger;
    linger_while_ = std::move(while_);
  }
  // While callers poll (or did within the last 2 ms) the worker thread leaves the worker
  // to them, unarmed, as long as `gate` allows (the router: while no call that is not
  // polled for is in flight).
  void SetParkWhile(std::function<bool()> gate) { park_while_ = std::move(gate); }
  // Called on the worker thread after each round of progress, not holding mutex().
  void SetAfterProgress(std::function<void()> fn) { after_progress_ = std::move(fn); }
  // Called on the worker thread after each round of progress, holding mutex():
  // milliseconds until it must run again (-1: only when woken).
  void SetIdleHook(std::function<int()> hook) { idle_hook_ = std::move(hook); }

  // The buffer's UCX memory handle, registering it with the context the first time
  // (nullptr if that failed: UCX then registers per call).
  ucp_mem_h Register(UcxBuffer& buffer) ABSL_EXCLUSIVE_LOCKS_REQUIRED(ucx_mu_) {
    return buffers_->Register(buffer);
  }
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
  void Loop() ABSL_LOCKS_EXCLUDED(mu_, ucx_mu_);
  // The steps of the loop. Clears woken_; whether to stop (Stop was called and no posted
  // work is left).
  bool BeginRound() ABSL_LOCKS_EXCLUDED(mu_);
  // Posted work and progress until neither finds anything (`*active`: whether either
  // did), then the idle hook; returns its timeout.
  int RunUntilIdle(bool* active) ABSL_LOCKS_EXCLUDED(ucx_mu_);
  // Waits, the worker unarmed, for posted work, Wake, Stop or `timeout_ms` (capped).
  void Park(int timeout_ms) ABSL_LOCKS_EXCLUDED(mu_);
  bool HasPostedOrStop() ABSL_LOCKS_EXCLUDED(mu_);
  // Arms the worker and sleeps in epoll until the network or another thread has
  // something, or `timeout_ms`; returns at once if the worker has events already.
  void Sleep(int timeout_ms) ABSL_LOCKS_EXCLUDED(ucx_mu_);
  // The posted work, then a round of progress; whether either did anything.
  bool RunPostedAndProgress() ABSL_EXCLUSIVE_LOCKS_REQUIRED(ucx_mu_) ABSL_LOCKS_EXCLUDED(mu_);

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
  std::function<bool()> park_while_;
  // Threads in Poll now (0 or 1).
  std::atomic<int> pollers_{0};
  std::atomic<uint64_t> polls_{0};  // Poll calls so far

  Mutex ucx_mu_;
  // When the worker thread will next run its idle hook unless woken.
  std::chrono::steady_clock::time_point wake_at_ ABSL_GUARDED_BY(ucx_mu_) =
      std::chrono::steady_clock::time_point::max();
  std::vector<std::function<void()>> running_ ABSL_GUARDED_BY(ucx_mu_);  // posted, running

  // Taken inside ucx_mu_ (Post from a callback), never the other way round.
  Mutex mu_ ABSL_ACQUIRED_AFTER(ucx_mu_);
  std::vector<std::function<void()>> posted_ ABSL_GUARDED_BY(mu_);
  std::atomic<bool> has_posted_{false};  // !posted_.empty(), read without the lock
  bool stop_ ABSL_GUARDED_BY(mu_) = false;
  bool woken_ ABSL_GUARDED_BY(mu_) = false;
  bool parked_ ABSL_GUARDED_BY(mu_) = false;
  CondVar park_cv_;  // the worker thread, while a poller polls
  std::thread thread_;
};

}  // namespace moemesh
