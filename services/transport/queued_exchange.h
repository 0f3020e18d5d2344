// QueuedExchange: an ExpertTransport::Exchange over a callback-style send, for transports
// whose completions arrive on other threads (the UCX worker, the in-process fakes).
// Completions are queued from any thread and run inside Wait, where `read` turns each
// reply into the response handed to `done` (a UCX reply is parsed by the thread that
// waits for it). Before it sleeps, Wait lets `poll` (if set) drive the transport itself
// until a completion is queued or the transport gives up.
//
// Threads: Start, Track and Wait on the exchange's one thread; a completion from any.
#pragma once

#include <atomic>
#include <deque>
#include <functional>
#include <memory>
#include <string>
#include <utility>

#include "absl/base/thread_annotations.h"
#include "services/base/mutex.h"
#include "services/transport/transport.h"

namespace moemesh {

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
      MutexLock lock(&mu_);
      completed_.push_back({std::move(status), std::move(reply), slot});
      queued_.fetch_add(1, std::memory_order_release);
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
        MutexLock lock(&mu_);
        mu_.Await(this, &QueuedExchange::HasCompleted);
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
  bool HasCompleted() const ABSL_SHARED_LOCKS_REQUIRED(mu_) { return !completed_.empty(); }

  Send send_;
  Read read_;
  Poll poll_;
  std::deque<ExpertTransport::Done> dones_;  // stable addresses; the exchange's thread only
  int pending_ = 0;                          // started, `done` not run; the exchange's thread
  Mutex mu_;
  std::deque<Completion> completed_ ABSL_GUARDED_BY(mu_);
  std::atomic<int> queued_{0};  // completed_.size(), read without the lock
};

// Replies that arrive as responses already (the in-process fakes).
using ResponseExchange = QueuedExchange<std::unique_ptr<v1::ComputeResponse>>;
absl::Status TakeResponse(std::unique_ptr<v1::ComputeResponse>& reply,
                          v1::ComputeResponse* response);

}  // namespace moemesh
