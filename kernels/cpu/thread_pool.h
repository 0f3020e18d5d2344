// A fixed pool of worker threads running ParallelFor jobs. The calling thread works on
// its own job too, so a pool of size N uses N threads in all. Idle workers sleep on a
// condition variable (no spinning). Several callers may run ParallelFor at once; their
// jobs share the workers.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

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
    int active = 0;  // workers inside Drain (guarded by mu_); the owner waits for 0
  };
  // Claims and runs items of `job` until none are left.
  static void Drain(Job& job);
  void WorkerLoop();

  std::mutex mu_;
  std::condition_variable work_cv_;   // workers wait for jobs
  std::condition_variable done_cv_;   // callers wait for their job's last item
  std::deque<Job*> jobs_;             // jobs with unclaimed items (guarded by mu_)
  bool stop_ = false;                 // guarded by mu_
  std::vector<std::thread> workers_;
};

// Sets OpenBLAS's own thread count (the kernels parallelise through ThreadPool and call
// BLAS single-threaded).
void SetBlasThreads(int n);

}  // namespace moemesh
