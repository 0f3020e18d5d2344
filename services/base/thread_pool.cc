#include "services/base/thread_pool.h"

#include <algorithm>
#include <cstdlib>

namespace moemesh {

ThreadPool::ThreadPool(int num_threads) {
  for (int i = 1; i < std::max(1, num_threads); ++i)
    workers_.emplace_back([this] { WorkerLoop(); });
}

ThreadPool::~ThreadPool() {
  {
    MutexLock lock(&mu_);
    stop_ = true;
  }
  work_cv_.SignalAll();
  for (auto& t : workers_) t.join();
}

void ThreadPool::Drain(Job& job) {
  for (int64_t i = job.next.fetch_add(1); i < job.n; i = job.next.fetch_add(1)) {
    (*job.fn)(i);
  }
}

void ThreadPool::ParallelFor(int64_t n, const std::function<void(int64_t)>& fn) {
  if (n <= 0) return;
  if (n == 1 || workers_.empty()) {
    for (int64_t i = 0; i < n; ++i) fn(i);
    return;
  }
  Job job;
  job.fn = &fn;
  job.n = n;
  {
    MutexLock lock(&mu_);
    jobs_.push_back(&job);
  }
  work_cv_.SignalAll();
  Drain(job);
  // Every item is claimed now. Unlist the job so no worker picks it up again, then wait
  // until the workers still running its items have left it.
  MutexLock lock(&mu_);
  auto it = std::find(jobs_.begin(), jobs_.end(), &job);
  if (it != jobs_.end()) jobs_.erase(it);
  while (job.active.load(std::memory_order_relaxed) != 0) done_cv_.Wait(&mu_);
}

void ThreadPool::WorkerLoop() {
  mu_.Lock();
  while (true) {
    while (!stop_ && jobs_.empty()) work_cv_.Wait(&mu_);
    if (stop_) break;
    Job* job = jobs_.front();
    if (job->next.load() >= job->n) {  // fully claimed: unlist it and look again
      jobs_.pop_front();
      continue;
    }
    // `active` keeps the owner from returning (and destroying the job) while this
    // worker may still touch it; it changes only under mu_.
    job->active.fetch_add(1, std::memory_order_relaxed);
    mu_.Unlock();
    Drain(*job);
    mu_.Lock();
    auto it = std::find(jobs_.begin(), jobs_.end(), job);
    if (it != jobs_.end()) jobs_.erase(it);  // Drain returned: nothing left to claim
    if (job->active.fetch_sub(1, std::memory_order_relaxed) == 1) done_cv_.SignalAll();
  }
  mu_.Unlock();
}

ThreadPool& ThreadPool::Default() {
  static ThreadPool* pool = [] {
    int n = static_cast<int>(std::thread::hardware_concurrency());
    if (const char* env = std::getenv("MOEMESH_THREADS")) n = std::atoi(env);
    return new ThreadPool(std::clamp(n, 1, 1024));
  }();
  return *pool;
}

}  // namespace moemesh
