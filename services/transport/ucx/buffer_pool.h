// Payload buffers of the UCX data plane: page-aligned, pre-faulted, in power-of-two size
// classes, kept for reuse and registered with the UCP context once each, so that no call
// pays for a mapping, page faults or a registration.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <set>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "services/base/mutex.h"

// UCX types, kept out of this header.
typedef struct ucp_context* ucp_context_h;
typedef struct ucp_mem* ucp_mem_h;

namespace moemesh {

class UcxBufferPool;
class UcxWorkerThread;

// A payload buffer from a UcxBufferPool: `size` bytes used of `capacity`. Returned to
// its pool when the handle goes.
struct UcxBuffer {
  char* data = nullptr;
  size_t size = 0;
  size_t capacity = 0;
  ucp_mem_h memh = nullptr;  // set under the worker's lock, the first time UCX needs it
  bool pinned = false;       // page-locked for CUDA copies (services/transport/ucx/device.h)
  int size_class = 0;
  std::shared_ptr<UcxBufferPool> pool;
};
struct UcxBufferReturn {
  void operator()(UcxBuffer* b) const;
};
using UcxBufferPtr = std::unique_ptr<UcxBuffer, UcxBufferReturn>;

// Keeps, per size class, as many buffers as were ever in use at once (at least a few), up
// to 1 GiB in all; surplus buffers are unmapped (a registered one on the worker thread,
// through SetPoster). Owned by a shared_ptr (each buffer holds its pool). Thread-safe;
// registration goes through UcxWorkerThread::Register, under the worker's lock.
class UcxBufferPool : public std::enable_shared_from_this<UcxBufferPool> {
 public:
  explicit UcxBufferPool(ucp_context_h context) : context_(context) {}
  ~UcxBufferPool();
  // A buffer of at least `size` bytes, its `size` set; nullptr when no memory can be mapped.
  UcxBufferPtr Take(size_t size) ABSL_LOCKS_EXCLUDED(mu_);
  // Unregisters every buffer (before the context goes) and frees the kept ones; buffers
  // returned later are just freed.
  void Close() ABSL_LOCKS_EXCLUDED(mu_);
  // Undoes `pinned` before a buffer's memory goes (set by services/transport/ucx/device.h).
  void SetUnpin(std::function<void(UcxBuffer*)> unpin) ABSL_LOCKS_EXCLUDED(mu_) {
    MutexLock lock(&mu_);
    unpin_ = std::move(unpin);
  }
  // How surplus registered buffers reach the worker thread to be unregistered.
  void SetPoster(std::function<void(std::function<void()>)> post) ABSL_LOCKS_EXCLUDED(mu_) {
    MutexLock lock(&mu_);
    poster_ = std::move(post);
  }
  // Buffers registered so far (each once), and kept for reuse now; for tests.
  int64_t registrations() const { return registrations_.load(); }
  int64_t kept() const ABSL_LOCKS_EXCLUDED(mu_);

 private:
  friend struct UcxBufferReturn;
  friend class UcxWorkerThread;  // Register, which it calls holding the worker's lock

  struct Class {
    std::vector<UcxBuffer*> free;  // kept for reuse
    size_t out = 0;                // taken and not yet returned
    size_t high = 0;               // the most ever out at once
  };

  // The buffer's UCX memory handle, registering it the first time (nullptr if
  // registration failed: UCX then registers per call).
  ucp_mem_h Register(UcxBuffer& buffer) ABSL_LOCKS_EXCLUDED(mu_);
  void Return(UcxBuffer* b) ABSL_LOCKS_EXCLUDED(mu_);
  void Free(UcxBuffer* b) ABSL_LOCKS_EXCLUDED(mu_);

  const ucp_context_h context_;
  std::atomic<int64_t> registrations_{0};
  mutable Mutex mu_;
  std::vector<Class> classes_ ABSL_GUARDED_BY(mu_);  // by size class
  size_t kept_bytes_ ABSL_GUARDED_BY(mu_) = 0;       // in the free lists
  std::set<UcxBuffer*> registered_ ABSL_GUARDED_BY(mu_);
  bool closed_ ABSL_GUARDED_BY(mu_) = false;
  std::function<void(std::function<void()>)> poster_ ABSL_GUARDED_BY(mu_);
  std::function<void(UcxBuffer*)> unpin_ ABSL_GUARDED_BY(mu_);
};

}  // namespace moemesh
