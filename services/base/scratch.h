// Scratch memory reused across calls. Fresh buffers of a layer call's size (megabytes to
// hundreds of megabytes) would be page-faulted in on every call, which costs more than the
// GEMMs; so the servers keep them and only ever grow them.
#pragma once

#include <cstdint>
#include <memory>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "services/base/mutex.h"

namespace moemesh {

// Grows v to at least n elements (never shrinks) and returns its data.
template <typename T>
T* Sized(std::vector<T>& v, int64_t n) {
  if (static_cast<int64_t>(v.size()) < n) v.resize(n);
  return v.data();
}

// Objects kept for reuse: Take hands out the most recently returned one (the hottest in
// cache), or a new T when none is free; the Lease gives it back when it goes, however the
// caller's scope ends. Thread-safe; the list grows to the most leases out at once.
template <typename T>
class FreeList {
 public:
  class Lease {
   public:
    Lease(FreeList* list, std::unique_ptr<T> item) : list_(list), item_(std::move(item)) {}
    Lease(Lease&& other) noexcept = default;
    Lease& operator=(Lease&&) = delete;
    Lease(const Lease&) = delete;
    ~Lease() {
      if (item_ != nullptr) list_->Return(std::move(item_));
    }
    T& operator*() const { return *item_; }
    T* operator->() const { return item_.get(); }

   private:
    FreeList* list_;
    std::unique_ptr<T> item_;
  };

  Lease Take() {
    {
      MutexLock lock(&mu_);
      if (!free_.empty()) {
        std::unique_ptr<T> item = std::move(free_.back());
        free_.pop_back();
        return Lease(this, std::move(item));
      }
    }
    return Lease(this, std::make_unique<T>());
  }

  // Items kept now; for tests and gauges.
  size_t kept() const {
    MutexLock lock(&mu_);
    return free_.size();
  }
  // Calls fn(const T&) on each kept item, holding the list's lock (fn must not Take).
  template <typename Fn>
  void ForEachKept(Fn fn) const {
    MutexLock lock(&mu_);
    for (const auto& item : free_) fn(*item);
  }

 private:
  void Return(std::unique_ptr<T> item) {
    MutexLock lock(&mu_);
    free_.push_back(std::move(item));
  }

  mutable Mutex mu_;
  std::vector<std::unique_ptr<T>> free_ ABSL_GUARDED_BY(mu_);
};

}  // namespace moemesh
