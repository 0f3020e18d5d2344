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
#include <vector>

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
  // been called (exactly once, from any thread), or in CancelAll. The completion holds the
  // shared state, not the exchange: one that comes after CancelAll finds its call
  // abandoned and drops the reply, whether or not the exchange is still there.
  Complete Track(ExpertTransport::Done done) {
    const size_t index = dones_.size();
    dones_.push_back(std::move(done));
    {
      MutexLock lock(&state_->mu);
      state_->abandoned.push_back(false);
    }
    ++pending_;
    return [state = state_, index](absl::Status status, Reply reply) {
      MutexLock lock(&state->mu);
      if (state->abandoned[index]) return;  // cancelled: the reply goes with this call
      state->completed.push_back({std::move(status), std::move(reply), index});
      state->queued.fetch_add(1, std::memory_order_release);
    };
  }

  void Wait() override { WaitUntil(ExpertTransport::Clock::time_point::max(), nullptr); }

  bool WaitUntil(ExpertTransport::Clock::time_point until,
                 const std::function<bool()>& enough) override {
    v1::ComputeResponse response;
    State& st = *state_;
    while (pending_ > 0) {
      if (enough && enough()) return false;
      Completion c;
      if (poll_ && st.queued.load(std::memory_order_acquire) == 0) {
        poll_([&st] { return st.queued.load(std::memory_order_acquire) > 0; });
      }
      {
        MutexLock lock(&st.mu);
        if (until == ExpertTransport::Clock::time_point::max()) {
          st.mu.Await(&st, &State::HasCompleted);
        } else if (!st.mu.AwaitWithDeadline(&st, &State::HasCompleted, until)) {
          return false;
        }
        c = std::move(st.completed.front());
        st.completed.pop_front();
        st.queued.fetch_sub(1, std::memory_order_relaxed);
      }
      --pending_;
      if (c.status.ok()) c.status = read_(c.reply, &response);
      c.reply = Reply();  // released (a UCX buffer back to its pool) before `done` runs
      ExpertTransport::Done done = std::move(dones_[c.index]);
      dones_[c.index] = nullptr;
      done(c.status, c.status.ok() ? &response : nullptr);
      response.Clear();
    }
    return true;
  }

  // Calls whose completion is queued already finish as they came, in the next Wait; the
  // others are abandoned: their `done` runs here with CANCELLED.
  void CancelAll() override {
    std::vector<size_t> cancelled;
    {
      MutexLock lock(&state_->mu);
      std::vector<bool> queued(dones_.size(), false);
      for (const Completion& c : state_->completed) queued[c.index] = true;
      for (size_t i = 0; i < dones_.size(); ++i) {
        if (dones_[i] && !queued[i]) {
          state_->abandoned[i] = true;
          cancelled.push_back(i);
        }
      }
    }
    for (size_t i : cancelled) {
      --pending_;
      ExpertTransport::Done done = std::move(dones_[i]);
      dones_[i] = nullptr;
      done(absl::CancelledError("cancelled: another call answered first"), nullptr);
    }
  }

 private:
  struct Completion {
    absl::Status status;
    Reply reply;
    size_t index = 0;  // into dones_
  };
  // What completions touch, shared with them.
  struct State {
    Mutex mu;
    std::deque<Completion> completed ABSL_GUARDED_BY(mu);
    std::vector<bool> abandoned ABSL_GUARDED_BY(mu);  // by call index
    std::atomic<int> queued{0};                       // completed.size(), read without the lock
    bool HasCompleted() const ABSL_SHARED_LOCKS_REQUIRED(mu) { return !completed.empty(); }
  };

  Send send_;
  Read read_;
  Poll poll_;
  std::deque<ExpertTransport::Done> dones_;  // by call index; emptied once run
  int pending_ = 0;                          // started, `done` not run; the exchange's thread
  const std::shared_ptr<State> state_ = std::make_shared<State>();
};

// Replies that arrive as responses already (the in-process fakes).
using ResponseExchange = QueuedExchange<std::unique_ptr<v1::ComputeResponse>>;
absl::Status TakeResponse(std::unique_ptr<v1::ComputeResponse>& reply,
                          v1::ComputeResponse* response);

}  // namespace moemesh
