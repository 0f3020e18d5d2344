// Mutex, SharedMutex, MutexLock, ReaderMutexLock, CondVar: the project's locks.
// std::mutex / std::shared_mutex / std::condition_variable underneath, abseil's lock
// annotations on top, so clang's -Wthread-safety checks every ABSL_GUARDED_BY member
// (CI builds with it) and ThreadSanitizer sees every lock (CI runs the concurrent suites
// under it). Not absl::Mutex: Debian's abseil is built without NDEBUG (deadlock detection
// on every lock: ~0.2 µs against ~0.02 µs) and without TSan's annotations, so TSan would
// take every absl::Mutex-guarded access for a race.
//
// The API follows absl::Mutex where the code uses it: Lock/Unlock/TryLock, AssertHeld
// (annotation only: std::mutex cannot tell who holds it), Await on a condition (re-checked
// whenever the mutex is released), CondVar with explicit Signal.
#pragma once

#include <chrono>
#include <condition_variable>
#include <mutex>
#include <shared_mutex>

#include "absl/base/thread_annotations.h"

namespace moemesh {

class CondVar;

class ABSL_LOCKABLE Mutex {
 public:
  Mutex() = default;
  Mutex(const Mutex&) = delete;
  Mutex& operator=(const Mutex&) = delete;

  void Lock() ABSL_EXCLUSIVE_LOCK_FUNCTION() { mu_.lock(); }
  // Wakes the threads in Await to re-check their conditions: before the unlock, because
  // an Await that returns may destroy the mutex (a call's state, freed once the call is
  // complete), and nothing may touch it after that.
  void Unlock() ABSL_UNLOCK_FUNCTION() {
    if (awaiting_ > 0) await_cv_.notify_all();
    mu_.unlock();
  }
  bool TryLock() ABSL_EXCLUSIVE_TRYLOCK_FUNCTION(true) { return mu_.try_lock(); }
  // Tells the analysis the lock is held here (code it cannot follow: a UCX callback run
  // inside progress under this lock). Checks nothing at run time.
  void AssertHeld() const ABSL_ASSERT_EXCLUSIVE_LOCK() {}

  // Holding the lock: releases it until (obj->*cond)() is true (re-checked whenever the
  // mutex is released), and returns holding it. `cond` is annotated as needing the lock.
  template <typename T>
  void Await(const T* obj, bool (T::*cond)() const) ABSL_EXCLUSIVE_LOCKS_REQUIRED(this) {
    AwaitUntil([&] { return (obj->*cond)(); }, std::chrono::steady_clock::time_point::max());
  }
  void Await(const bool* flag) ABSL_EXCLUSIVE_LOCKS_REQUIRED(this) {
    AwaitUntil([&] { return *flag; }, std::chrono::steady_clock::time_point::max());
  }
  // As Await, giving up at `deadline` (or after `timeout`); whether the condition holds.
  template <typename T, typename Clock, typename Duration>
  bool AwaitWithDeadline(const T* obj, bool (T::*cond)() const,
                         std::chrono::time_point<Clock, Duration> deadline)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(this) {
    return AwaitUntil([&] { return (obj->*cond)(); }, deadline);
  }
  template <typename Rep, typename Period>
  bool AwaitWithTimeout(const bool* flag, std::chrono::duration<Rep, Period> timeout)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(this) {
    return AwaitUntil([&] { return *flag; }, std::chrono::steady_clock::now() + timeout);
  }

 private:
  friend class CondVar;

  template <typename Pred, typename Clock, typename Duration>
  bool AwaitUntil(Pred pred, std::chrono::time_point<Clock, Duration> deadline)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(this) {
    if (pred()) return true;
    std::unique_lock<std::mutex> lock(mu_, std::adopt_lock);
    ++awaiting_;
    bool holds;
    if (deadline == std::chrono::time_point<Clock, Duration>::max()) {
      await_cv_.wait(lock, pred);
      holds = true;
    } else {
      holds = await_cv_.wait_until(lock, deadline, pred);
    }
    --awaiting_;
    lock.release();  // still held: the caller's
    return holds;
  }
  // Before a CondVar wait releases the mutex: that release must wake Await's threads too.
  void WakeAwaiting() {
    if (awaiting_ > 0) await_cv_.notify_all();
  }

  std::mutex mu_;
  std::condition_variable await_cv_;
  int awaiting_ = 0;  // threads in Await; read and written holding mu_
};

// A reader/writer lock (no Await): many readers or one writer.
class ABSL_LOCKABLE SharedMutex {
 public:
  SharedMutex() = default;
  SharedMutex(const SharedMutex&) = delete;
  SharedMutex& operator=(const SharedMutex&) = delete;
  void Lock() ABSL_EXCLUSIVE_LOCK_FUNCTION() { mu_.lock(); }
  void Unlock() ABSL_UNLOCK_FUNCTION() { mu_.unlock(); }
  void ReaderLock() ABSL_SHARED_LOCK_FUNCTION() { mu_.lock_shared(); }
  void ReaderUnlock() ABSL_UNLOCK_FUNCTION() { mu_.unlock_shared(); }

 private:
  std::shared_mutex mu_;
};

// Holds a Mutex (or a SharedMutex as its writer) for its scope.
class ABSL_SCOPED_LOCKABLE MutexLock {
 public:
  explicit MutexLock(Mutex* mu) ABSL_EXCLUSIVE_LOCK_FUNCTION(mu) : mu_(mu) { mu->Lock(); }
  explicit MutexLock(SharedMutex* mu) ABSL_EXCLUSIVE_LOCK_FUNCTION(mu) : shared_(mu) { mu->Lock(); }
  ~MutexLock() ABSL_UNLOCK_FUNCTION() {
    if (mu_ != nullptr) mu_->Unlock();
    if (shared_ != nullptr) shared_->Unlock();
  }
  MutexLock(const MutexLock&) = delete;
  MutexLock& operator=(const MutexLock&) = delete;

 private:
  Mutex* mu_ = nullptr;
  SharedMutex* shared_ = nullptr;
};

// Holds a SharedMutex as a reader for its scope.
class ABSL_SCOPED_LOCKABLE ReaderMutexLock {
 public:
  explicit ReaderMutexLock(SharedMutex* mu) ABSL_SHARED_LOCK_FUNCTION(mu) : mu_(mu) {
    mu->ReaderLock();
  }
  ~ReaderMutexLock() ABSL_UNLOCK_FUNCTION() { mu_->ReaderUnlock(); }
  ReaderMutexLock(const ReaderMutexLock&) = delete;
  ReaderMutexLock& operator=(const ReaderMutexLock&) = delete;

 private:
  SharedMutex* mu_;
};

// A condition variable for a Mutex: Wait releases it while waiting; Signal and SignalAll
// wake one or every waiter.
class CondVar {
 public:
  void Wait(Mutex* mu) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu) {
    mu->WakeAwaiting();
    std::unique_lock<std::mutex> lock(mu->mu_, std::adopt_lock);
    cv_.wait(lock);
    lock.release();
  }
  // Whether `deadline` passed (as CondVar::WaitWithDeadline).
  template <typename Clock, typename Duration>
  bool WaitWithDeadline(Mutex* mu, std::chrono::time_point<Clock, Duration> deadline)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu) {
    mu->WakeAwaiting();
    std::unique_lock<std::mutex> lock(mu->mu_, std::adopt_lock);
    const bool timed_out = cv_.wait_until(lock, deadline) == std::cv_status::timeout;
    lock.release();
    return timed_out;
  }
  void Signal() { cv_.notify_one(); }
  void SignalAll() { cv_.notify_all(); }

 private:
  std::condition_variable cv_;
};

}  // namespace moemesh
