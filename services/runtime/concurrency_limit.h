// ConcurrencyLimit: at most N holders at once; the others block until a slot frees.
// The servers use it to bound how many calls compute (and hold scratch) at once.
#pragma once

#include <condition_variable>
#include <mutex>

namespace moemesh {

class ConcurrencyLimit {
 public:
  explicit ConcurrencyLimit(int limit) : limit_(limit) {}

  // Holds one slot for its lifetime.
  class Slot {
   public:
    explicit Slot(ConcurrencyLimit& l) : l_(l) {
      std::unique_lock<std::mutex> lock(l_.mu_);
      l_.cv_.wait(lock, [&] { return l_.held_ < l_.limit_; });
      ++l_.held_;
    }
    ~Slot() {
      {
        std::lock_guard<std::mutex> lock(l_.mu_);
        --l_.held_;
      }
      l_.cv_.notify_one();
    }
    Slot(const Slot&) = delete;
    Slot& operator=(const Slot&) = delete;

   private:
    ConcurrencyLimit& l_;
  };

 private:
  const int limit_;
  std::mutex mu_;
  std::condition_variable cv_;
  int held_ = 0;  // guarded by mu_
};

}  // namespace moemesh
