// ConcurrencyLimit: at most N holders at once; the others block until a slot frees. The
// servers use it to bound how many calls compute (and hold scratch) at once. Thread-safe.
#pragma once

#include <chrono>

#include "absl/base/thread_annotations.h"
#include "services/base/mutex.h"

namespace moemesh {

class ConcurrencyLimit {
 public:
  explicit ConcurrencyLimit(int limit) : limit_(limit) {}

  // Holds one slot for its lifetime.
  class Slot {
   public:
    explicit Slot(ConcurrencyLimit& l) : l_(l) {
      MutexLock lock(&l_.mu_);
      l_.mu_.Await(&l_, &ConcurrencyLimit::HasFreeSlot);
      ++l_.held_;
    }
    // Waits for a slot until `deadline` at most; acquired() tells whether it got one.
    template <typename Clock, typename Duration>
    Slot(ConcurrencyLimit& l, std::chrono::time_point<Clock, Duration> deadline) : l_(l) {
      MutexLock lock(&l_.mu_);
      acquired_ = l_.mu_.AwaitWithDeadline(&l_, &ConcurrencyLimit::HasFreeSlot, deadline);
      if (acquired_) ++l_.held_;
    }
    ~Slot() {
      if (!acquired_) return;
      MutexLock lock(&l_.mu_);
      --l_.held_;
    }
    bool acquired() const { return acquired_; }
    Slot(const Slot&) = delete;
    Slot& operator=(const Slot&) = delete;

   private:
    ConcurrencyLimit& l_;
    bool acquired_ = true;
  };

 private:
  bool HasFreeSlot() const ABSL_SHARED_LOCKS_REQUIRED(mu_) { return held_ < limit_; }

  const int limit_;
  Mutex mu_;
  int held_ ABSL_GUARDED_BY(mu_) = 0;
};

}  // namespace moemesh
