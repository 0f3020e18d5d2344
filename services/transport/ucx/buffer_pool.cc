#include "services/transport/ucx/buffer_pool.h"

#include <sys/mman.h>
#include <ucp/api/ucp.h>

#include <algorithm>

namespace moemesh {
namespace {

// Buffer size classes: powers of two from 4 KiB. Returned buffers are kept for reuse:
// in each class as many as were ever in use at once (at least a few), up to kKeepBytes
// in all; beyond that they are unmapped (an mmap, page faults and a registration per
// call would cost more than the copy they serve).
constexpr int kMinClass = 12;
constexpr int kMaxClass = 40;
constexpr size_t kKeepBytes = size_t{1} << 30;

int SizeClass(size_t n) {
  int c = kMinClass;
  while (c < kMaxClass && (size_t{1} << c) < n) ++c;
  return c;
}

size_t KeepPerClass(int c) { return std::clamp<size_t>((size_t{256} << 20) >> c, 1, 16); }

}  // namespace

void UcxBufferReturn::operator()(UcxBuffer* b) const {
  std::shared_ptr<UcxBufferPool> pool = std::move(b->pool);
  pool->Return(b);
}

UcxBufferPtr UcxBufferPool::Take(size_t size) {
  const int c = SizeClass(size);
  UcxBuffer* b = nullptr;
  {
    MutexLock lock(&mu_);
    if (classes_.size() <= static_cast<size_t>(c)) classes_.resize(c + 1);
    Class& k = classes_[c];
    k.high = std::max(k.high, ++k.out);
    if (!k.free.empty()) {
      b = k.free.back();
      k.free.pop_back();
      kept_bytes_ -= b->capacity;
    }
  }
  if (b == nullptr) {
    const size_t capacity = size_t{1} << c;
    // Pre-faulted: a page fault per 4 KiB on the first use would cost more than the copy.
    void* p = ::mmap(nullptr, capacity, PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
    if (p == MAP_FAILED) {
      MutexLock lock(&mu_);
      --classes_[c].out;
      return nullptr;
    }
    b = new UcxBuffer;
    b->data = static_cast<char*>(p);
    b->capacity = capacity;
    b->size_class = c;
  }
  b->size = size;
  b->pool = shared_from_this();
  return UcxBufferPtr(b);
}

ucp_mem_h UcxBufferPool::Register(UcxBuffer& b) {
  if (b.memh != nullptr) return b.memh;
  ucp_mem_map_params_t mp{};
  mp.field_mask = UCP_MEM_MAP_PARAM_FIELD_ADDRESS | UCP_MEM_MAP_PARAM_FIELD_LENGTH;
  mp.address = b.data;
  mp.length = b.capacity;
  if (ucp_mem_map(context_, &mp, &b.memh) != UCS_OK) {
    b.memh = nullptr;
    return nullptr;
  }
  ++registrations_;
  MutexLock lock(&mu_);
  registered_.insert(&b);
  return b.memh;
}

void UcxBufferPool::Return(UcxBuffer* b) {
  std::function<void(std::function<void()>)> post;
  {
    MutexLock lock(&mu_);
    Class& k = classes_[b->size_class];  // taken from this pool: the class exists
    --k.out;
    if (!closed_ && k.free.size() < std::max(KeepPerClass(b->size_class), k.high) &&
        kept_bytes_ + b->capacity <= kKeepBytes) {
      k.free.push_back(b);
      kept_bytes_ += b->capacity;
      return;
    }
    if (b->memh != nullptr && !closed_) post = poster_;
  }
  if (post) {
    // Surplus and registered: unregistered on the worker thread.
    post([self = shared_from_this(), b] { self->Free(b); });
  } else {
    Free(b);
  }
}

void UcxBufferPool::Free(UcxBuffer* b) {
  if (b->pinned) {
    std::function<void(UcxBuffer*)> unpin;
    {
      MutexLock lock(&mu_);
      unpin = unpin_;
    }
    if (unpin) unpin(b);
  }
  if (b->memh != nullptr) {
    bool registered;
    {
      MutexLock lock(&mu_);
      registered = registered_.erase(b) > 0;
    }
    if (registered) ucp_mem_unmap(context_, b->memh);
  }
  ::munmap(b->data, b->capacity);
  delete b;
}

void UcxBufferPool::Close() {
  MutexLock lock(&mu_);
  closed_ = true;
  poster_ = nullptr;
  // Every registration goes now, before the context, those of buffers still held
  // elsewhere (sends that never completed) included: UCX is done with them.
  for (UcxBuffer* b : registered_) {
    ucp_mem_unmap(context_, b->memh);
    b->memh = nullptr;
  }
  registered_.clear();
  for (Class& k : classes_) {
    for (UcxBuffer* b : k.free) {
      if (b->pinned && unpin_) unpin_(b);
      ::munmap(b->data, b->capacity);
      delete b;
    }
    k.free.clear();
  }
  kept_bytes_ = 0;
}

int64_t UcxBufferPool::kept() const {
  MutexLock lock(&mu_);
  int64_t n = 0;
  for (const Class& k : classes_) n += static_cast<int64_t>(k.free.size());
  return n;
}

UcxBufferPool::~UcxBufferPool() { Close(); }

}  // namespace moemesh
