// A fixed pool of worker threads running ParallelFor jobs. The calling thread works on
// its own job too, so a pool of size N uses N threads in all. Idle workers sleep on a
// condition variable (no spinning). Several callers may run ParallelFor at once; their
// jobs share the workers.
#pragma once

#include <atomic>
#include <cstdint>
#include <deque>
#include <functional>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "services/base/mutex.h"

namespace moemesh {

class ThreadPool {
 public:
  // num_threads counts the caller: num_threads - 1 workers are started. At least 1.
  explicit ThreadPool(int num_threads);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int size() const { return static_cast<int>(workers_.size()) + 1; }

  // Runs fn(i) for every i in [0, n) and returns when all have finished. Which thread
  // runs which i is unspecified; fn must not depend on it.
  void ParallelFor(int64_t n, const std::function<void(int64_t)>& fn);

  // The process-wide pool: MOEMESH_THREADS if set, else the hardware thread count.
  static ThreadPool& Default();

 private:
  struct Job {
    const std::function<void(int64_t)>* fn;
    int64_t n;
    std::atomic<int64_t> next{0};
    // Workers inside Drain; changed holding mu_ (so the owner's wait sees every change),
    // and the owner returns (destroying the job) only at 0.
    std::atomic<int> active{0};
  };
  // Claims and runs items of `job` until none are left.
  static void Drain(Job& job);
  void WorkerLoop() ABSL_LOCKS_EXCLUDED(mu_);

  Mutex mu_;
  CondVar work_cv_;                             // workers wait for jobs
  CondVar done_cv_;                             // callers wait for their job's last item
  std::deque<Job*> jobs_ ABSL_GUARDED_BY(mu_);  // jobs with unclaimed items
  bool stop_ ABSL_GUARDED_BY(mu_) = false;
  std::vector<std::thread> workers_;
};

}  // namespace moemesh
