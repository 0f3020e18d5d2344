#include "services/transport/ucx/ucx_transport.h"

#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <pthread.h>
#include <sys/mman.h>
#include <ucp/api/ucp.h>
#include <ucs/config/global_opts.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <random>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "absl/strings/ascii.h"
#include "services/rpc/wire.h"

namespace moemesh {
namespace {

constexpr uint16_t kRequestAm = 1;
constexpr uint16_t kReplyAm = 2;
constexpr uint16_t kHelloAm = 3;
constexpr uint64_t kMagic = 0x314873654d656f4dULL;  // "MoeMesh1"

// UCX's shared-memory fragment (FIFO element) size unless the environment sets one:
// 32 KiB of payload plus the 64 bytes of headers UCX's own 8256 default allows.
constexpr char kPosixSegSize[] = "32832";

// How long a call may wait on a service whose transport cannot report failure before
// the control plane is asked whether it is still there, and how often after that.
constexpr auto kProbeAfter = std::chrono::milliseconds(100);
constexpr auto kProbeTimeout = std::chrono::milliseconds(500);

struct HelloHeader {
  uint64_t magic;
  uint64_t client;
};

struct RequestHeader {
  uint64_t magic;
  uint64_t id;
  uint64_t client;
  uint32_t format;  // kPlain or kSegmented
  uint32_t reserved;
};

// Request data formats. kPlain: a serialized v1::ComputeRequest. kSegmented: a
// SegmentsPrefix, `count` u64 segment lengths, the serialized request with every batch's
// rows data empty (`envelope` bytes), then batch i's row bytes as segment i; the head
// and every segment padded with zeros to kAlign bytes, so the rows the service computes
// on where they land start aligned (the buffers are page-aligned).
constexpr uint32_t kPlain = 0;
constexpr uint32_t kSegmented = 1;
constexpr size_t kAlign = 64;
size_t Aligned(size_t n) { return (n + kAlign - 1) / kAlign * kAlign; }
char kZeros[kAlign] = {};  // padding, read by UCX
struct SegmentsPrefix {
  uint32_t count;
  uint32_t envelope;
};

struct ReplyHeader {
  uint64_t magic;
  uint64_t id;
  int32_t code;  // absl::StatusCode
  uint32_t reserved;
};

absl::Status UcsError(const std::string& what, ucs_status_t status) {
  return absl::InternalError(absl::StrCat(what, ": ", ucs_status_string(status)));
}

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

size_t KeepPerClass(int c) {
  return std::clamp<size_t>((size_t{256} << 20) >> c, 1, 16);
}

// Send parameters: completion callback, user data, flags and the buffer's memory handle.
ucp_request_param_t SendParams(ucp_send_nbx_callback_t cb, void* user_data, uint32_t flags,
                               ucp_mem_h memh) {
  ucp_request_param_t prm{};
  prm.op_attr_mask =
      UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA | UCP_OP_ATTR_FIELD_FLAGS;
  prm.cb.send = cb;
  prm.user_data = user_data;
  prm.flags = flags;
  if (memh != nullptr) {
    prm.op_attr_mask |= UCP_OP_ATTR_FIELD_MEMH;
    prm.memh = memh;
  }
  return prm;
}

// Makes `prm` describe its data as an iov (a ucp_dt_iov_t array): no memory handle then,
// one cannot cover several buffers. Over shared memory UCX 1.13 moves an iov by its
// pipelined copy rather than a cma read (see UcxExpertTransport::StartOnWorker).
void AsIov(ucp_request_param_t& prm) {
  prm.op_attr_mask &= ~UCP_OP_ATTR_FIELD_MEMH;
  prm.op_attr_mask |= UCP_OP_ATTR_FIELD_DATATYPE;
  prm.datatype = ucp_dt_make_iov();
}

// Closes an endpoint without waiting (pending operations are cancelled).
void CloseEndpoint(ucp_ep_h ep) {
  ucp_request_param_t prm{};
  prm.op_attr_mask = UCP_OP_ATTR_FIELD_FLAGS;
  prm.flags = UCP_EP_CLOSE_FLAG_FORCE;
  const ucs_status_ptr_t req = ucp_ep_close_nbx(ep, &prm);
  if (UCS_PTR_IS_PTR(req)) ucp_request_free(req);  // completes inside the worker
}

// Connects to a peer's worker address, with peer-failure detection where the transports
// allow it (`*detects_failure`); UCX 1.13's shared memory does not, and is connected
// without it.
ucs_status_t CreateEndpoint(ucp_worker_h worker, const std::string& address,
                            ucp_err_handler_cb_t on_failure, void* arg, ucp_ep_h* ep,
                            bool* detects_failure) {
  ucp_ep_params_t params{};
  params.field_mask = UCP_EP_PARAM_FIELD_REMOTE_ADDRESS | UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE |
                      UCP_EP_PARAM_FIELD_ERR_HANDLER;
  params.address = reinterpret_cast<const ucp_address_t*>(address.data());
  params.err_mode = UCP_ERR_HANDLING_MODE_PEER;
  params.err_handler.cb = on_failure;
  params.err_handler.arg = arg;
  *detects_failure = true;
  // UCX logs an ERROR when no transport to the peer detects failures; that case is
  // expected here (shared memory) and handled below, so the message is held back.
  const ucs_log_level_t log_level = ucs_global_opts.log_component.log_level;
  ucs_global_opts.log_component.log_level = std::min(log_level, UCS_LOG_LEVEL_FATAL);
  ucs_status_t s = ucp_ep_create(worker, &params, ep);
  ucs_global_opts.log_component.log_level = log_level;
  if (s == UCS_ERR_UNREACHABLE) {
    params.field_mask &= ~(UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE | UCP_EP_PARAM_FIELD_ERR_HANDLER);
    *detects_failure = false;
    s = ucp_ep_create(worker, &params, ep);
  }
  if (s != UCS_OK) *ep = nullptr;
  return s;
}

// What the endpoint's rendezvous lanes are (UCX 1.13 has no query for an endpoint's
// transports; its printed configuration names the lanes): whether any reads or writes
// remote memory (RDMA, cma, ...: rendezvous then gathers an iov sender's segments, where
// over TCP, with no such lane, an iov send measured ~2.5x slower than one packed
// buffer), and whether those are all shared memory between processes of one node.
struct RendezvousLanes {
  bool remote_memory = false;
  bool shared_memory_only = false;
};
RendezvousLanes InspectLanes(ucp_ep_h ep) {
  char* text = nullptr;
  size_t size = 0;
  FILE* f = ::open_memstream(&text, &size);
  if (f == nullptr) return {};
  ucp_ep_print_info(ep, f);
  std::fclose(f);
  RendezvousLanes lanes;
  if (text != nullptr) {
    lanes.shared_memory_only = true;
    for (absl::string_view line : absl::StrSplit(text, '\n')) {
      if (!absl::StrContains(line, "rma_bw#")) continue;
      lanes.remote_memory = true;
      if (!absl::StrContains(line, "cma/") && !absl::StrContains(line, "knem/") &&
          !absl::StrContains(line, "xpmem/")) {
        lanes.shared_memory_only = false;
      }
    }
    lanes.shared_memory_only &= lanes.remote_memory;
  }
  std::free(text);
  return lanes;
}

absl::Status SetHandler(ucp_worker_h worker, uint16_t id, ucp_am_recv_callback_t cb, void* arg) {
  ucp_am_handler_param_t p{};
  p.field_mask = UCP_AM_HANDLER_PARAM_FIELD_ID | UCP_AM_HANDLER_PARAM_FIELD_CB |
                 UCP_AM_HANDLER_PARAM_FIELD_ARG;
  p.id = id;
  p.cb = cb;
  p.arg = arg;
  const ucs_status_t s = ucp_worker_set_am_recv_handler(worker, &p);
  return s == UCS_OK ? absl::OkStatus() : UcsError("ucp_worker_set_am_recv_handler", s);
}

absl::StatusCode CodeFromWire(int32_t code) {
  return code > 0 && code <= 16 ? static_cast<absl::StatusCode>(code) : absl::StatusCode::kUnknown;
}

}  // namespace

// --- UcxBufferPool ------------------------------------------------------------------

void UcxBufferReturn::operator()(UcxBuffer* b) const {
  std::shared_ptr<UcxBufferPool> pool = std::move(b->pool);
  pool->Return(b);
}

UcxBufferPtr UcxBufferPool::Take(size_t size) {
  const int c = SizeClass(size);
  UcxBuffer* b = nullptr;
  {
    std::lock_guard<std::mutex> lock(mu_);
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
      std::lock_guard<std::mutex> lock(mu_);
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
  std::lock_guard<std::mutex> lock(mu_);
  registered_.insert(&b);
  return b.memh;
}

void UcxBufferPool::Return(UcxBuffer* b) {
  std::function<void(std::function<void()>)> post;
  {
    std::lock_guard<std::mutex> lock(mu_);
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
      std::lock_guard<std::mutex> lock(mu_);
      unpin = unpin_;
    }
    if (unpin) unpin(b);
  }
  if (b->memh != nullptr) {
    bool registered;
    {
      std::lock_guard<std::mutex> lock(mu_);
      registered = registered_.erase(b) > 0;
    }
    if (registered) ucp_mem_unmap(context_, b->memh);
  }
  ::munmap(b->data, b->capacity);
  delete b;
}

void UcxBufferPool::Close() {
  std::lock_guard<std::mutex> lock(mu_);
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
  std::lock_guard<std::mutex> lock(mu_);
  int64_t n = 0;
  for (const Class& k : classes_) n += static_cast<int64_t>(k.free.size());
  return n;
}

UcxBufferPool::~UcxBufferPool() { Close(); }

// --- UcxWorkerThread ---------------------------------------------------------------

bool UcxTlsMayUseSharedMemory(const char* tls) {
  if (tls == nullptr) return true;
  absl::string_view list(tls);
  const bool exclude = absl::ConsumePrefix(&list, "^");
  bool named = false;  // a shared-memory transport or alias appears in the list
  for (absl::string_view t : absl::StrSplit(list, ',')) {
    t = absl::StripAsciiWhitespace(t);
    named |= t == "all" || t == "sm" || t == "shm" || t == "mm" || t == "posix" || t == "sysv";
  }
  return exclude ? !named : named;
}

absl::StatusOr<std::unique_ptr<UcxWorkerThread>> UcxWorkerThread::Create(const std::string& name) {
  auto w = std::unique_ptr<UcxWorkerThread>(new UcxWorkerThread());
  ucp_config_t* config = nullptr;
  ucs_status_t s = ucp_config_read(nullptr, nullptr, &config);  // UCX_* from the environment
  if (s != UCS_OK) return UcsError("ucp_config_read", s);
  // Shared memory moves our large payloads by UCX's pipelined copy through its FIFO (see
  // StartOnWorker); fragments of 32 KiB instead of UCX's 8 KiB cut the per-fragment work
  // (2 MiB requests: median 10.6 -> 16.8 GB/s on the benchmark VM, UCX 1.13.1; 64 KiB
  // trips an assertion in UCX 1.13's rendezvous). "MM_SEG_SIZE" is how ucp_config_modify
  // names the shared-memory transports' UCX_POSIX_SEG_SIZE and UCX_SYSV_SEG_SIZE. Only a
  // default: either in the environment wins, as all of UCX's environment does.
  // UCX warns about a setting no transport took, so it is set only where UCX_TLS leaves
  // shared memory in.
  if (std::getenv("UCX_POSIX_SEG_SIZE") == nullptr && std::getenv("UCX_SYSV_SEG_SIZE") == nullptr &&
      UcxTlsMayUseSharedMemory(std::getenv("UCX_TLS"))) {
    ucp_config_modify(config, "MM_SEG_SIZE", kPosixSegSize);
  }
  ucp_params_t params{};
  params.field_mask = UCP_PARAM_FIELD_FEATURES;
  params.features = UCP_FEATURE_AM | UCP_FEATURE_WAKEUP;
  s = ucp_init(&params, config, &w->context_);
  ucp_config_release(config);
  if (s != UCS_OK) return UcsError(absl::StrCat(name, ": ucp_init"), s);
  ucp_context_attr_t attr{};
  attr.field_mask = UCP_ATTR_FIELD_MEMORY_TYPES;
  if (ucp_context_query(w->context_, &attr) == UCS_OK) w->memory_types_ = attr.memory_types;
  w->buffers_ = std::make_shared<UcxBufferPool>(w->context_);
  ucp_worker_params_t wp{};
  wp.field_mask = UCP_WORKER_PARAM_FIELD_THREAD_MODE;
  wp.thread_mode = UCS_THREAD_MODE_SERIALIZED;  // one thread at a time: under ucx_mu_
  s = ucp_worker_create(w->context_, &wp, &w->worker_);
  if (s != UCS_OK) return UcsError(absl::StrCat(name, ": ucp_worker_create"), s);
  ucp_address_t* address = nullptr;
  size_t length = 0;
  s = ucp_worker_get_address(w->worker_, &address, &length);
  if (s != UCS_OK) return UcsError(absl::StrCat(name, ": ucp_worker_get_address"), s);
  w->address_.assign(reinterpret_cast<const char*>(address), length);
  ucp_worker_release_address(w->worker_, address);
  s = ucp_worker_get_efd(w->worker_, &w->worker_fd_);
  if (s != UCS_OK) return UcsError(absl::StrCat(name, ": ucp_worker_get_efd"), s);
  w->epoll_fd_ = ::epoll_create1(EPOLL_CLOEXEC);
  w->event_fd_ = ::eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  if (w->epoll_fd_ < 0 || w->event_fd_ < 0) {
    return absl::InternalError(absl::StrCat(name, ": epoll/eventfd: ", std::strerror(errno)));
  }
  for (int fd : {w->worker_fd_, w->event_fd_}) {
    epoll_event ev{};
    ev.events = EPOLLIN;
    ev.data.fd = fd;
    if (::epoll_ctl(w->epoll_fd_, EPOLL_CTL_ADD, fd, &ev) != 0) {
      return absl::InternalError(absl::StrCat(name, ": epoll_ctl: ", std::strerror(errno)));
    }
  }
  return w;
}

void UcxWorkerThread::Start() {
  buffers_->SetPoster([this](std::function<void()> fn) { Post(std::move(fn)); });
  thread_ = std::thread([this] {
    pthread_setname_np(pthread_self(), "ucx-worker");
    Loop();
  });
}

void UcxWorkerThread::Stop() {
  if (!thread_.joinable()) return;
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  const uint64_t one = 1;
  (void)!::write(event_fd_, &one, sizeof one);
  thread_.join();
}

UcxWorkerThread::~UcxWorkerThread() {
  Stop();
  // Registrations go before the context; buffers still held elsewhere are unmapped
  // when they come back.
  if (buffers_ != nullptr) buffers_->Close();
  if (worker_ != nullptr) ucp_worker_destroy(worker_);
  if (context_ != nullptr) ucp_cleanup(context_);
  if (epoll_fd_ >= 0) ::close(epoll_fd_);
  if (event_fd_ >= 0) ::close(event_fd_);
}

void UcxWorkerThread::Post(std::function<void()> fn) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    posted_.push_back(std::move(fn));
    has_posted_ = true;
    // A poller runs it (and wakes the worker thread for what it leaves when it stops).
    if (pollers_.load() > 0) return;
  }
  Wake();
}

bool UcxWorkerThread::RunPostedAndProgress() {
  bool ran = false;
  if (has_posted_.load(std::memory_order_acquire)) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      running_.swap(posted_);  // both keep their capacity: no allocation per round
      has_posted_ = false;
    }
    for (auto& fn : running_) fn();
    ran = !running_.empty();
    running_.clear();
  }
  return ucp_worker_progress(worker_) != 0 || ran;
}

void UcxWorkerThread::WakeBy(std::chrono::steady_clock::time_point t) {
  if (t >= wake_at_) return;
  wake_at_ = t;
  Wake();
}

void UcxWorkerThread::Wake() {
  const uint64_t one = 1;
  (void)!::write(event_fd_, &one, sizeof one);  // asleep in epoll
  {
    std::lock_guard<std::mutex> lock(mu_);  // or parked while a poller polls
    woken_ = true;
  }
  park_cv_.notify_one();
}

void UcxWorkerThread::WakeIfParked() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (!parked_) return;
    woken_ = true;
  }
  park_cv_.notify_one();
}

bool UcxWorkerThread::Poll(const std::function<bool()>& ready, std::chrono::nanoseconds spin) {
  if (spin.count() <= 0 || on_worker_thread()) return ready();
  int none = 0;
  if (!pollers_.compare_exchange_strong(none, 1)) return ready();  // another thread polls
  polls_.fetch_add(1, std::memory_order_relaxed);
  const auto end = std::chrono::steady_clock::now() + spin;
  bool done;
  while (!(done = ready()) && std::chrono::steady_clock::now() < end) {
    if (ucx_mu_.try_lock()) {
      RunPostedAndProgress();
      ucx_mu_.unlock();
    }
  }
  bool wake;
  {
    std::lock_guard<std::mutex> lock(mu_);
    pollers_ = 0;
    wake = !done || !posted_.empty();
  }
  // Given up: the worker thread takes over (parked, or asleep without a timeout for
  // calls whose caller was to poll: deadlines and probes are its). Done: it looks again
  // at its next timeout, no wakeup.
  if (wake) Wake();
  return done || ready();
}

void UcxWorkerThread::Loop() {
  // While callers poll, the worker thread looks at least this often (posted work and
  // Wake come sooner); it sleeps armed once nobody has polled for this long.
  constexpr auto kParked = std::chrono::milliseconds(2);
  auto last_active = std::chrono::steady_clock::now();
  uint64_t polls_seen = 0;
  while (true) {
    bool stop;
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop = stop_ && posted_.empty();
      woken_ = false;
    }
    if (stop) {
      // Last rounds: endpoints closed by the posted work finish closing, and the
      // operations they cancel complete.
      std::lock_guard<std::mutex> lock(ucx_mu_);
      for (int i = 0; i < 100 && ucp_worker_progress(worker_) != 0; ++i) {
      }
      break;
    }
    int timeout_ms;
    bool active = false;
    {
      std::lock_guard<std::mutex> lock(ucx_mu_);
      while (RunPostedAndProgress()) active = true;
      timeout_ms = idle_hook_ ? idle_hook_() : -1;
      wake_at_ = timeout_ms < 0 ? std::chrono::steady_clock::time_point::max()
                                : std::chrono::steady_clock::now() + std::chrono::milliseconds(timeout_ms);
    }
    if (after_progress_) after_progress_();
    const auto now = std::chrono::steady_clock::now();
    if (active) last_active = now;
    const uint64_t polls = polls_.load(std::memory_order_relaxed);
    if ((pollers_.load() > 0 || polls != polls_seen) && (!park_while_ || park_while_())) {
      // Callers poll the worker (now, or lately: a burst of calls): leave it unarmed, so
      // that no peer signals and nobody is woken per message.
      polls_seen = polls;
      std::unique_lock<std::mutex> lock(mu_);
      const auto wait = timeout_ms < 0 ? kParked
                                       : std::min<std::chrono::steady_clock::duration>(
                                             kParked, std::chrono::milliseconds(timeout_ms));
      parked_ = true;
      park_cv_.wait_for(lock, wait, [&] { return !posted_.empty() || stop_ || woken_; });
      parked_ = false;
      continue;
    }
    polls_seen = polls;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (!posted_.empty() || stop_) continue;
    }
    // Lately busy: poll a while longer before sleeping (the next message of a burst is
    // then taken without a wakeup).
    if (now - last_active < linger_ && (!linger_while_ || linger_while_())) continue;
    // Sleep until the network or another thread has something for us.
    {
      std::lock_guard<std::mutex> lock(ucx_mu_);
      if (ucp_worker_arm(worker_) == UCS_ERR_BUSY) continue;
    }
    epoll_event events[2];
    ::epoll_wait(epoll_fd_, events, 2, timeout_ms);
    uint64_t count;
    (void)!::read(event_fd_, &count, sizeof count);
  }
}

// --- UCX callbacks -----------------------------------------------------------------

struct UcxExpertTransport::Pending {
  UcxExpertTransport* owner = nullptr;
  uint64_t id = 0;
  std::string endpoint;
  Clock::time_point started, deadline;
  bool polled = false;  // its caller polls for the reply (and wakes the worker thread if it gives up)
  std::chrono::steady_clock::time_point sent_at;
  Complete complete;
  // UCX reads both until the send completes (UCX 1.13 does not copy the header).
  RequestHeader header{};
  UcxBufferPtr payload;
  // kSegmented: the row bytes moved out of the request, sent after `payload` (which then
  // holds prefix, lengths and envelope), gathered by UCX from `iov`.
  uint32_t format = kPlain;
  std::vector<std::string> segments;
  std::vector<ucp_dt_iov_t> iov;
  // Or the caller's bytes (SendInPlace), and their memory type.
  std::shared_ptr<const void> keep;
  const void* data = nullptr;
  size_t size = 0;
  ucs_memory_type_t memory_type = UCS_MEMORY_TYPE_HOST;
};

struct UcxExpertTransport::Peer {
  UcxExpertTransport* owner = nullptr;
  std::string endpoint;
  std::string address;  // the worker address `ep` is connected to
  ucp_ep_h ep = nullptr;
  bool detects_failure = true;  // connected with UCP_ERR_HANDLING_MODE_PEER
  bool gathers = false;         // UCX gathers iov sends to it (no packing copy here)
  bool copy_large = false;      // large payloads go as an iov (see StartOnWorker)
  HelloHeader hello{};          // read by UCX until the hello is sent
  std::set<uint64_t> pending;   // calls in flight to it
  Clock::time_point last_probe{};
};

struct UcxComputeServer::Client {
  UcxComputeServer* owner = nullptr;
  uint64_t id = 0;
  std::string address;
  ucp_ep_h ep = nullptr;
  bool copy_large = false;  // large replies go as an iov (see StartOnWorker)
};

struct UcxCallbacks {
  // Fetches a rendezvous message (`desc` from an AM callback that returned
  // UCS_INPROGRESS) into `buffer` once that callback has returned; `done` runs with
  // the outcome (and frees the request).
  static void ReceiveRendezvous(UcxWorkerThread& worker, void* desc, UcxBuffer* buffer,
                                ucp_am_recv_data_nbx_callback_t done, void* user_data) {
    worker.Post([&worker, desc, buffer, done, user_data] {
      ucp_request_param_t prm{};
      prm.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA;
      prm.cb.recv_am = done;
      prm.user_data = user_data;
      if (ucp_mem_h memh = worker.buffers().Register(*buffer); memh != nullptr) {
        prm.op_attr_mask |= UCP_OP_ATTR_FIELD_MEMH;
        prm.memh = memh;
      }
      const ucs_status_ptr_t req =
          ucp_am_recv_data_nbx(worker.worker(), desc, buffer->data, buffer->size, &prm);
      if (req == nullptr) {
        done(nullptr, UCS_OK, buffer->size, user_data);
      } else if (UCS_PTR_IS_ERR(req)) {
        done(nullptr, UCS_PTR_STATUS(req), 0, user_data);
      }
    });
  }

  // Frees a completed request (a null one completed in place).
  static void Free(void* request) {
    if (request != nullptr) ucp_request_free(request);
  }

  static void HelloSent(void* request, ucs_status_t, void*) { Free(request); }

  // Client: a request's send finished (the payload may go).
  static void RequestSent(void* request, ucs_status_t status, void* user_data) {
    Free(request);
    std::unique_ptr<std::shared_ptr<UcxExpertTransport::Pending>> holder(
        static_cast<std::shared_ptr<UcxExpertTransport::Pending>*>(user_data));
    const auto p = std::move(*holder);
    p->payload.reset();
    p->keep.reset();
    p->segments.clear();
    if (status == UCS_OK || status == UCS_ERR_CANCELED || p->owner->closing_.load()) return;
    // A failing endpoint may complete its sends from UCX's async thread: the call ends
    // on the worker thread.
    p->owner->worker_->Post([p, status] {
      p->owner->Finish(p->id,
                       absl::UnavailableError(absl::StrCat(p->endpoint, ": send failed (",
                                                           ucs_status_string(status), ")")),
                       nullptr);
    });
  }

  // Client: the connection to a service failed.
  static void PeerFailed(void* arg, ucp_ep_h ep, ucs_status_t status) {
    // UCX may call this from its async thread: the work moves to the worker thread.
    auto* peer = static_cast<UcxExpertTransport::Peer*>(arg);
    if (peer->owner->closing_.load()) return;  // endpoints going away with the worker
    peer->owner->worker_->Post([peer, ep, status] {
      peer->owner->FailPeer(peer, ep,
                            absl::UnavailableError(absl::StrCat(peer->endpoint, ": connection failed (",
                                                                ucs_status_string(status), ")")));
    });
  }

  struct ReplyRecv {
    UcxExpertTransport* owner;
    ReplyHeader header;
    UcxBufferPtr buffer;
  };

  static void ReplyReceived(void* request, ucs_status_t status, size_t, void* user_data) {
    Free(request);
    std::shared_ptr<ReplyRecv> r(static_cast<ReplyRecv*>(user_data));
    if (status == UCS_OK) {
      r->owner->OnReply(r->header.id, r->header.code, std::move(r->buffer));
      return;
    }
    if (r->owner->closing_.load()) return;
    r->owner->worker_->Post([r, status] {
      r->owner->Finish(r->header.id,
                       absl::UnavailableError(absl::StrCat("the reply's transfer failed (",
                                                           ucs_status_string(status), ")")),
                       nullptr);
    });
  }

  // Client: AM 2, a reply.
  static ucs_status_t OnReply(void* arg, const void* header, size_t header_length, void* data,
                              size_t length, const ucp_am_recv_param_t* param) {
    auto* t = static_cast<UcxExpertTransport*>(arg);
    const bool rndv = (param->recv_attr & UCP_AM_RECV_ATTR_FLAG_RNDV) != 0;
    ReplyHeader h;
    if (header_length != sizeof h) return Drop();
    std::memcpy(&h, header, sizeof h);
    if (h.magic != kMagic || t->pending_.count(h.id) == 0) {
      return Drop();  // not ours, or late: dropped
    }
    UcxBufferPtr buffer = t->buffers().Take(length);
    if (buffer == nullptr) {
      t->Finish(h.id, absl::ResourceExhaustedError(absl::StrCat("no memory for a reply of ", length, " bytes")),
                nullptr);
      return Drop();
    }
    if (!rndv) {
      std::memcpy(buffer->data, data, length);
      t->OnReply(h.id, h.code, std::move(buffer));
      return UCS_OK;
    }
    UcxBuffer* raw = buffer.get();
    auto* r = new ReplyRecv{t, h, std::move(buffer)};
    ReceiveRendezvous(*t->worker_, data, raw, &ReplyReceived, r);
    return UCS_INPROGRESS;
  }

  // A message not taken: returning UCS_OK from the callback lets UCX discard it (a
  // rendezvous one is cancelled towards its sender; releasing it here as well would
  // cancel it twice).
  static ucs_status_t Drop() { return UCS_OK; }

  struct RequestRecv {
    UcxComputeServer* owner;
    uint64_t client, id;
    uint32_t format;
    UcxBufferPtr buffer;
  };

  static void RequestReceived(void* request, ucs_status_t status, size_t, void* user_data) {
    Free(request);
    std::unique_ptr<RequestRecv> r(static_cast<RequestRecv*>(user_data));
    if (status != UCS_OK) {
      --r->owner->in_flight_;
      return;  // the client is gone; nothing to answer
    }
    const bool small = r->buffer->size <= kUcxInlineBytes;  // rendezvous over shared memory
    r->owner->Enqueue({r->client, r->id, r->format, std::move(r->buffer)}, small);
  }

  // Service: AM 3, a client introduces itself.
  static ucs_status_t OnHello(void* arg, const void* header, size_t header_length, void* data,
                              size_t length, const ucp_am_recv_param_t* param) {
    auto* server = static_cast<UcxComputeServer*>(arg);
    const bool rndv = (param->recv_attr & UCP_AM_RECV_ATTR_FLAG_RNDV) != 0;
    HelloHeader h;
    if (rndv || header_length != sizeof h) return Drop();
    std::memcpy(&h, header, sizeof h);
    if (h.magic != kMagic) return UCS_OK;
    // Connected after this callback, before any reply: replies are posted later.
    server->worker_->Post([server, client = h.client,
                           address = std::string(static_cast<const char*>(data), length)]() mutable {
      server->Hello(client, std::move(address));
    });
    return UCS_OK;
  }

  // Service: AM 1, a request.
  static ucs_status_t OnRequest(void* arg, const void* header, size_t header_length, void* data,
                                size_t length, const ucp_am_recv_param_t* param) {
    auto* server = static_cast<UcxComputeServer*>(arg);
    const bool rndv = (param->recv_attr & UCP_AM_RECV_ATTR_FLAG_RNDV) != 0;
    RequestHeader h;
    if (header_length != sizeof h) return Drop();
    std::memcpy(&h, header, sizeof h);
    if (h.magic != kMagic) return Drop();
    ++server->in_flight_;
    server->Arrived();
    auto fail = [&](absl::Status status) {
      UcxBufferPtr message = server->worker_->buffers().Take(status.message().size());
      if (message != nullptr) std::memcpy(message->data, status.message().data(), message->size);
      server->worker_->Post([server, client = h.client, id = h.id, code = static_cast<int32_t>(status.code()),
                             message = std::make_shared<UcxBufferPtr>(std::move(message))] {
        server->Reply(client, id, code, std::move(*message), true);
      });
      return UCS_OK;
    };
    if (length > static_cast<size_t>(server->max_message_bytes_)) {
      return fail(absl::ResourceExhaustedError(absl::StrCat(
          "request of ", length, " bytes is over the limit of ", server->max_message_bytes_)));
    }
    UcxBufferPtr buffer = server->worker_->buffers().Take(length);
    if (buffer == nullptr) {
      return fail(absl::ResourceExhaustedError(absl::StrCat("no memory for a request of ", length, " bytes")));
    }
    if (!rndv) {
      std::memcpy(buffer->data, data, length);
      server->Enqueue({h.client, h.id, h.format, std::move(buffer)}, length <= kUcxInlineBytes);
      return UCS_OK;
    }
    UcxBuffer* raw = buffer.get();
    auto* r = new RequestRecv{server, h.client, h.id, h.format, std::move(buffer)};
    ReceiveRendezvous(*server->worker_, data, raw, &RequestReceived, r);
    return UCS_INPROGRESS;
  }

  // Service: the endpoint back to a client failed (the client is gone).
  static void ClientFailed(void* arg, ucp_ep_h ep, ucs_status_t) {
    auto* client = static_cast<UcxComputeServer::Client*>(arg);
    if (client->owner->closing_.load()) return;  // endpoints going away with the worker
    client->owner->worker_->Post([client, ep] {
      if (client->ep != ep) return;
      CloseEndpoint(ep);
      client->ep = nullptr;
      --client->owner->clients_count_;
    });
  }

  // A reply's header and payload, alive until its send completes.
  struct OutgoingReply {
    ReplyHeader header;
    UcxBufferPtr payload;
    ucp_dt_iov_t iov{};
  };
  static void ReplySent(void* request, ucs_status_t, void* user_data) {
    Free(request);
    delete static_cast<OutgoingReply*>(user_data);
  }
};

// --- UcxExpertTransport ------------------------------------------------------------

UcxExpertTransport::UcxExpertTransport(std::shared_ptr<ExpertTransport> control,
                                       int max_message_bytes, std::chrono::microseconds spin)
    : control_(std::move(control)),
      max_message_bytes_(max_message_bytes),
      spin_(spin),
      client_id_(std::random_device{}() * 0x100000000ULL ^ std::random_device{}()) {}

absl::StatusOr<std::shared_ptr<UcxExpertTransport>> UcxExpertTransport::Create(
    std::shared_ptr<ExpertTransport> control, int max_message_bytes,
    std::chrono::microseconds spin) {
  auto t = std::shared_ptr<UcxExpertTransport>(
      new UcxExpertTransport(std::move(control), max_message_bytes, spin));
  auto worker = UcxWorkerThread::Create("router");
  if (!worker.ok()) return worker.status();
  t->worker_ = *std::move(worker);
  if (absl::Status s = SetHandler(t->worker_->worker(), kReplyAm, &UcxCallbacks::OnReply, t.get());
      !s.ok()) {
    return s;
  }
  t->worker_->SetIdleHook([raw = t.get()] { return raw->OnIdle(); });
  t->worker_->SetParkWhile([raw = t.get()] { return raw->unpolled_.load() == 0; });
  t->worker_->Start();
  t->prober_ = std::thread([raw = t.get()] {
    pthread_setname_np(pthread_self(), "ucx-prober");
    raw->ProbeLoop();
  });
  return t;
}

UcxExpertTransport::~UcxExpertTransport() {
  if (prober_.joinable()) {
    {
      std::lock_guard<std::mutex> lock(probe_mu_);
      probe_stop_ = true;
    }
    probe_cv_.notify_all();
    prober_.join();
  }
  if (worker_ == nullptr) return;
  closing_ = true;
  worker_->Post([this] {
    std::vector<uint64_t> ids;
    for (const auto& [id, p] : pending_) ids.push_back(id);
    for (uint64_t id : ids) Finish(id, absl::CancelledError("the UCX transport is shutting down"), nullptr);
    for (auto& [endpoint, peer] : peers_) {
      if (peer->ep != nullptr) CloseEndpoint(peer->ep);
      peer->ep = nullptr;
    }
  });
  worker_->Stop();  // runs the above; callbacks during the last rounds see closing_
  worker_.reset();
}

// A request in the segmented format, built in place: the head's room is reserved at
// the front of the buffer (an upper bound for `batches` batches), each batch's rows go
// after it, aligned, as the caller writes them; at the send the head is written so that
// it ends where the rows begin, and the message starts there.
class UcxOutgoingRequest final : public OutgoingRequest {
 public:
  static size_t HeadBound(int batches) {
    const size_t n = static_cast<size_t>(std::max(batches, 1));
    // Prefix, the lengths, and the envelope: the request's scalars plus, per batch, the
    // expert, dtype and a few dimensions as varints (no row bytes), with room to spare.
    return Aligned(sizeof(SegmentsPrefix) + n * sizeof(uint64_t) + 128 + n * 96);
  }

  UcxOutgoingRequest(UcxBufferPtr buffer, size_t reserve)
      : buffer_(std::move(buffer)), reserve_(reserve), at_(reserve) {}

  char* AddRows(int32_t expert, DType dtype, const std::vector<int64_t>& shape) override {
    const size_t n = AddBatch(expert, dtype, shape);
    if (at_ + Aligned(n) > buffer_->capacity) {
      // More than announced: moved to a larger buffer.
      UcxBufferPtr larger = buffer_->pool->Take(std::max(2 * buffer_->capacity, at_ + Aligned(n)));
      if (larger == nullptr) {
        request_.mutable_batches()->RemoveLast();
        return nullptr;
      }
      std::memcpy(larger->data + reserve_, buffer_->data + reserve_, at_ - reserve_);
      buffer_ = std::move(larger);
    }
    char* rows = buffer_->data + at_;
    std::memset(rows + n, 0, Aligned(n) - n);
    lengths_.push_back(n);
    at_ += Aligned(n);
    return rows;
  }

  std::unique_ptr<v1::ComputeRequest> TakeProto() override {
    size_t at = reserve_;
    for (int i = 0; i < request_.batches_size(); ++i) {
      request_.mutable_batches(i)->mutable_rows()->set_data(buffer_->data + at, lengths_[i]);
      at += Aligned(lengths_[i]);
    }
    return OutgoingRequest::TakeProto();
  }

  // Writes the head before the rows; the message's start, or nullptr if the head does
  // not fit in the room reserved for it.
  const char* Finish(size_t* size) {
    const size_t envelope = request_.ByteSizeLong();
    const size_t unpadded = sizeof(SegmentsPrefix) + sizeof(uint64_t) * lengths_.size() + envelope;
    const size_t head = Aligned(unpadded);
    if (head > reserve_) return nullptr;
    char* start = buffer_->data + (reserve_ - head);
    const SegmentsPrefix prefix{static_cast<uint32_t>(lengths_.size()), static_cast<uint32_t>(envelope)};
    char* at = start;
    std::memcpy(at, &prefix, sizeof prefix);
    at += sizeof prefix;
    std::memcpy(at, lengths_.data(), sizeof(uint64_t) * lengths_.size());
    at += sizeof(uint64_t) * lengths_.size();
    request_.SerializeWithCachedSizesToArray(reinterpret_cast<uint8_t*>(at));
    std::memset(start + unpadded, 0, head - unpadded);
    *size = head + (at_ - reserve_);
    return start;
  }

  UcxBufferPtr TakeBuffer() { return std::move(buffer_); }

 private:
  UcxBufferPtr buffer_;
  const size_t reserve_;
  size_t at_;
  std::vector<uint64_t> lengths_;
};

namespace {

// The router's exchange over UCX: QueuedExchange, plus requests built in registered
// buffers.
class UcxExchange final : public QueuedExchange<UcxBufferPtr> {
 public:
  using SendBuilt = std::function<void(const std::string& endpoint,
                                       std::unique_ptr<OutgoingRequest> request, Complete complete)>;
  UcxExchange(UcxExpertTransport* transport, Send send, SendBuilt send_built, Read read, Poll poll)
      : QueuedExchange(std::move(send), std::move(read), std::move(poll)),
        transport_(transport),
        send_built_(std::move(send_built)) {}

  std::unique_ptr<OutgoingRequest> NewRequest(size_t row_bytes, int batches) override {
    return transport_->NewRequest(row_bytes, batches);
  }
  void Send(const std::string& endpoint, std::unique_ptr<OutgoingRequest> request,
            ExpertTransport::Done done) override {
    send_built_(endpoint, std::move(request), Track(std::move(done)));
  }

 private:
  UcxExpertTransport* const transport_;
  const SendBuilt send_built_;
};

}  // namespace

std::unique_ptr<OutgoingRequest> UcxExpertTransport::NewRequest(size_t row_bytes, int batches) {
  const size_t reserve = UcxOutgoingRequest::HeadBound(batches);
  UcxBufferPtr buffer =
      buffers().Take(reserve + row_bytes + kAlign * static_cast<size_t>(std::max(batches, 0)));
  if (buffer == nullptr) return std::make_unique<OutgoingRequest>();
  return std::make_unique<UcxOutgoingRequest>(std::move(buffer), reserve);
}

void UcxExpertTransport::SendBuilt(const std::string& endpoint, std::unique_ptr<OutgoingRequest> request,
                                   Clock::time_point deadline, bool polled, Complete complete) {
  auto* built = dynamic_cast<UcxOutgoingRequest*>(request.get());
  size_t size = 0;
  const char* start = built != nullptr ? built->Finish(&size) : nullptr;
  if (start == nullptr) {  // not built here, or a head larger than its room: as a protobuf
    SendRequest(endpoint, request->TakeProto(), deadline, polled, std::move(complete));
    return;
  }
  std::shared_ptr<Pending> p = Prepare(endpoint, size, deadline, complete);
  if (p == nullptr) return;
  p->format = kSegmented;
  p->polled = polled && size <= kUcxInlineBytes;  // as SendRequest
  p->data = start;
  p->size = size;
  p->payload = built->TakeBuffer();
  Start(std::move(p));
}

std::unique_ptr<ExpertTransport::Exchange> UcxExpertTransport::NewExchange(Clock::time_point deadline) {
  return std::make_unique<UcxExchange>(
      this,
      [this, deadline](const std::string& endpoint, std::unique_ptr<v1::ComputeRequest> request,
                       Complete complete) {
        SendRequest(endpoint, std::move(request), deadline, spin_.count() > 0, std::move(complete));
      },
      [this, deadline](const std::string& endpoint, std::unique_ptr<OutgoingRequest> request,
                       Complete complete) {
        SendBuilt(endpoint, std::move(request), deadline, spin_.count() > 0, std::move(complete));
      },
      [](UcxBufferPtr& reply, v1::ComputeResponse* response) {
        // Parsed on the waiting thread, not the worker's.
        return response->ParseFromArray(reply->data, static_cast<int>(reply->size))
                   ? absl::OkStatus()
                   : absl::InternalError("a UCX reply does not parse as a ComputeResponse");
      },
      [this](const std::function<bool()>& ready) {
        // Only where it pays: not while large calls are in flight (the worker thread drives
        // their rendezvous, and they take long enough that a wakeup does not matter), and
        // not when the last two small calls both took longer than the spin (a service
        // that computes for milliseconds: spinning would only take a core from it).
        const int64_t spin_ns = std::chrono::duration_cast<std::chrono::nanoseconds>(spin_).count();
        if (unpolled_.load() == 0 && std::min(latency_ns_[0].load(), latency_ns_[1].load()) < spin_ns) {
          worker_->Poll(ready, spin_);
        }
      });
}

absl::Status UcxExpertTransport::Info(const std::string& endpoint, Clock::time_point deadline,
                                      v1::InfoResponse* response) {
  return control_->Info(endpoint, deadline, response);
}

bool UcxExpertTransport::cuda_direct() const {
  return (worker_->memory_types() & UCS_BIT(UCS_MEMORY_TYPE_CUDA)) != 0;
}

bool UcxExpertTransport::Resolve(const std::string& endpoint, Clock::time_point deadline,
                                 const Complete& complete) {
  {
    std::lock_guard<std::mutex> lock(addresses_mu_);
    if (addresses_.count(endpoint) > 0) return true;
  }
  v1::InfoResponse info;
  const absl::Status s = control_->Info(endpoint, deadline, &info);
  if (!s.ok()) {
    complete(absl::Status(s.code(), absl::StrCat(endpoint, ": ", s.message())), nullptr);
    return false;
  }
  if (info.ucx_worker_address().empty()) {
    complete(absl::UnavailableError(absl::StrCat(
                 endpoint, " serves no UCX data plane (start it with --transport ucx)")),
             nullptr);
    return false;
  }
  std::lock_guard<std::mutex> lock(addresses_mu_);
  addresses_[endpoint] = info.ucx_worker_address();
  return true;
}

std::shared_ptr<UcxExpertTransport::Pending> UcxExpertTransport::Prepare(
    const std::string& endpoint, size_t size, Clock::time_point deadline, Complete& complete) {
  if (size > static_cast<size_t>(max_message_bytes_)) {
    complete(absl::ResourceExhaustedError(absl::StrCat(endpoint, ": request of ", size,
                                                       " bytes is over the limit of ",
                                                       max_message_bytes_)),
             nullptr);
    return nullptr;
  }
  // The service's worker address, from Info on first use (and after a failure).
  if (!Resolve(endpoint, deadline, complete)) return nullptr;
  auto p = std::make_shared<Pending>();
  p->endpoint = endpoint;
  p->deadline = deadline;
  p->complete = std::move(complete);
  return p;
}

void UcxExpertTransport::Send(const std::string& endpoint, UcxBufferPtr request,
                              Clock::time_point deadline, Complete complete) {
  std::shared_ptr<Pending> p = Prepare(endpoint, request->size, deadline, complete);
  if (p == nullptr) return;
  p->data = request->data;
  p->size = request->size;
  p->payload = std::move(request);
  Start(std::move(p));
}

void UcxExpertTransport::SendRequest(const std::string& endpoint,
                                     std::unique_ptr<v1::ComputeRequest> request,
                                     Clock::time_point deadline, Complete complete) {
  SendRequest(endpoint, std::move(request), deadline, false, std::move(complete));
}

void UcxExpertTransport::SendRequest(const std::string& endpoint,
                                     std::unique_ptr<v1::ComputeRequest> request,
                                     Clock::time_point deadline, bool polled, Complete complete) {
  std::vector<std::string> segments;
  segments.reserve(request->batches_size());
  size_t total = 0;
  for (v1::ExpertRows& b : *request->mutable_batches()) {
    segments.push_back(std::move(*b.mutable_rows()->mutable_data()));  // moved, not copied
    b.mutable_rows()->clear_data();
    total += Aligned(segments.back().size());
  }
  const size_t envelope = request->ByteSizeLong();
  const size_t unpadded = sizeof(SegmentsPrefix) + sizeof(uint64_t) * segments.size() + envelope;
  const size_t head = Aligned(unpadded);
  std::shared_ptr<Pending> p = Prepare(endpoint, total + head, deadline, complete);
  if (p == nullptr) return;
  UcxBufferPtr buffer = buffers().Take(head);
  if (buffer == nullptr) {
    p->complete(absl::ResourceExhaustedError(absl::StrCat(endpoint, ": no memory for a request")),
                nullptr);
    return;
  }
  const SegmentsPrefix prefix{static_cast<uint32_t>(segments.size()), static_cast<uint32_t>(envelope)};
  char* at = buffer->data;
  std::memcpy(at, &prefix, sizeof prefix);
  at += sizeof prefix;
  for (const std::string& seg : segments) {
    const uint64_t n = seg.size();
    std::memcpy(at, &n, sizeof n);
    at += sizeof n;
  }
  request->SerializeWithCachedSizesToArray(reinterpret_cast<uint8_t*>(at));
  std::memset(buffer->data + unpadded, 0, head - unpadded);
  p->format = kSegmented;
  // Small calls only: their replies are eager, taken whenever the caller polls; a large
  // one's rendezvous moves on while the caller does other work only if the worker thread
  // watches the worker.
  p->polled = polled && total + head <= kUcxInlineBytes;
  p->data = buffer->data;
  p->size = buffer->size;
  p->payload = std::move(buffer);
  p->segments = std::move(segments);
  Start(std::move(p));
}

void UcxExpertTransport::SendInPlace(const std::string& endpoint, std::shared_ptr<const void> keep,
                                     const void* data, size_t size, int memory_type,
                                     Clock::time_point deadline, Complete complete) {
  std::shared_ptr<Pending> p = Prepare(endpoint, size, deadline, complete);
  if (p == nullptr) return;
  p->keep = std::move(keep);
  p->data = data;
  p->size = size;
  p->memory_type = static_cast<ucs_memory_type_t>(memory_type);
  Start(std::move(p));
}

void UcxExpertTransport::Start(std::shared_ptr<Pending> p) {
  p->owner = this;
  p->id = next_id_++;
  p->started = Clock::now();
  p->sent_at = std::chrono::steady_clock::now();
  ++in_flight_;
  // Sent from this thread, holding the worker: no hand-off to the worker thread on the
  // way out.
  worker_->RunLocked([&] { StartOnWorker(p); });
}

UcxExpertTransport::Peer* UcxExpertTransport::Connect(const std::string& endpoint, std::string* error) {
  std::unique_ptr<Peer>& peer = peers_[endpoint];
  if (peer == nullptr) {
    peer = std::make_unique<Peer>();
    peer->owner = this;
    peer->endpoint = endpoint;
  }
  if (peer->ep != nullptr) return peer.get();
  std::string address;
  {
    std::lock_guard<std::mutex> lock(addresses_mu_);
    auto it = addresses_.find(endpoint);
    if (it != addresses_.end()) address = it->second;
  }
  if (address.empty()) {
    *error = "its UCX address is unknown (it failed; retry)";
    return nullptr;
  }
  const ucs_status_t s = CreateEndpoint(worker_->worker(), address, &UcxCallbacks::PeerFailed,
                                        peer.get(), &peer->ep, &peer->detects_failure);
  if (s != UCS_OK) {
    *error = absl::StrCat("cannot connect over UCX: ", ucs_status_string(s));
    std::lock_guard<std::mutex> lock(addresses_mu_);
    addresses_.erase(endpoint);
    return nullptr;
  }
  peer->address = std::move(address);
  const RendezvousLanes lanes = InspectLanes(peer->ep);
  peer->gathers = lanes.remote_memory;
  peer->copy_large = lanes.shared_memory_only;
  // Introduce ourselves: the service replies on an endpoint of its own, to this worker.
  peer->hello = {kMagic, client_id_};
  ucp_request_param_t prm = SendParams(&UcxCallbacks::HelloSent, nullptr, 0, nullptr);
  const ucs_status_ptr_t req =
      ucp_am_send_nbx(peer->ep, kHelloAm, &peer->hello, sizeof peer->hello,
                      worker_->address().data(), worker_->address().size(), &prm);
  if (UCS_PTR_IS_ERR(req)) {
    *error = absl::StrCat("cannot greet it over UCX: ", ucs_status_string(UCS_PTR_STATUS(req)));
    CloseEndpoint(peer->ep);
    peer->ep = nullptr;
    return nullptr;
  }
  return peer.get();
}

void UcxExpertTransport::StartOnWorker(std::shared_ptr<Pending> p) {
  pending_[p->id] = p;
  if (!p->polled) {
    ++unpolled_;  // the worker thread must watch the worker for it
    if (!worker_->on_worker_thread()) {
      worker_->WakeIfParked();
      // It may be asleep until later than this call's deadline (or its first probe): it
      // must look again by then. (A polled call's caller wakes it if it gives up.)
      const auto by = std::min(p->deadline, p->started + kProbeAfter);
      worker_->WakeBy(std::chrono::steady_clock::now() +
                      std::chrono::duration_cast<std::chrono::steady_clock::duration>(
                          by - Clock::now()));
    }
  }
  std::string error;
  Peer* peer = Connect(p->endpoint, &error);
  if (peer == nullptr) {
    Finish(p->id, absl::UnavailableError(absl::StrCat(p->endpoint, ": ", error)), nullptr);
    return;
  }
  peer->pending.insert(p->id);
  p->header = {kMagic, p->id, client_id_, p->format, 0};
  auto* holder = new std::shared_ptr<Pending>(p);  // keeps header and payload until sent
  ucp_request_param_t prm = SendParams(&UcxCallbacks::RequestSent, holder, 0,
                                      p->payload != nullptr ? buffers().Register(*p->payload) : nullptr);
  const void* data = p->data;
  size_t count = p->size;
  if (!p->segments.empty() && !peer->gathers) {
    // Packed into one registered buffer: a copy, cheaper over TCP than losing zero-copy.
    size_t total = p->payload->size;
    for (const std::string& seg : p->segments) total += Aligned(seg.size());
    if (UcxBufferPtr all = buffers().Take(total); all != nullptr) {
      std::memcpy(all->data, p->payload->data, p->payload->size);
      size_t at = p->payload->size;
      for (const std::string& seg : p->segments) {
        std::memcpy(all->data + at, seg.data(), seg.size());
        std::memset(all->data + at + seg.size(), 0, Aligned(seg.size()) - seg.size());
        at += Aligned(seg.size());
      }
      p->payload = std::move(all);
      p->segments.clear();
      data = p->payload->data;
      count = total;
      prm.memh = buffers().Register(*p->payload);
      if (prm.memh != nullptr) {
        prm.op_attr_mask |= UCP_OP_ATTR_FIELD_MEMH;
      } else {
        prm.op_attr_mask &= ~UCP_OP_ATTR_FIELD_MEMH;
      }
    }
  }
  if (!p->segments.empty()) {
    // Gathered by UCX: the head from the registered buffer, then each batch's rows.
    p->iov.clear();
    p->iov.push_back({p->payload->data, p->payload->size});
    for (const std::string& seg : p->segments) {
      if (!seg.empty()) p->iov.push_back({const_cast<char*>(seg.data()), seg.size()});
      if (const size_t pad = Aligned(seg.size()) - seg.size(); pad > 0) p->iov.push_back({kZeros, pad});
    }
    AsIov(prm);
    data = p->iov.data();
    count = p->iov.size();
  }
  if (peer->copy_large && p->segments.empty() && p->memory_type == UCS_MEMORY_TYPE_HOST &&
      count > kUcxInlineBytes) {
    // Over shared memory a large contiguous payload would go by a zero-copy read of the
    // sender's memory (cma), which in a request/reply flow between sleeping workers
    // left both processes idle half the time (1 MiB requests: 4-7 GB/s); described as
    // an iov it goes through UCX's pipelined copy via shared memory, which keeps both
    // busy (9-13 GB/s, this VM, UCX 1.13.1).
    p->iov.assign(1, {const_cast<void*>(data), count});
    AsIov(prm);
    data = p->iov.data();
    count = p->iov.size();
  }
  if (p->memory_type != UCS_MEMORY_TYPE_HOST) {
    prm.op_attr_mask |= UCP_OP_ATTR_FIELD_MEMORY_TYPE;
    prm.memory_type = p->memory_type;
  }
  const ucs_status_ptr_t req = ucp_am_send_nbx(peer->ep, kRequestAm, &p->header, sizeof p->header,
                                               data, count, &prm);
  if (req == nullptr) {
    delete holder;  // sent in place
    p->payload.reset();
    p->keep.reset();
    p->segments.clear();
  } else if (!UCS_PTR_IS_ERR(req)) {
    // The rest goes on in progress: the caller's own when it polls (it wakes the worker
    // thread if it gives up), the worker thread's otherwise.
    if (!worker_->on_worker_thread() && !p->polled) worker_->Wake();
  } else {
    delete holder;
    Finish(p->id,
           absl::UnavailableError(absl::StrCat(p->endpoint, ": send failed (",
                                               ucs_status_string(UCS_PTR_STATUS(req)), ")")),
           nullptr);
  }
}

void UcxExpertTransport::FailPeer(Peer* peer, ucp_ep_h ep, const absl::Status& status) {
  if (ep == nullptr || peer->ep != ep) return;  // that endpoint is gone already
  CloseEndpoint(peer->ep);
  peer->ep = nullptr;
  {
    // A restarted service has a new worker address: ask Info again.
    std::lock_guard<std::mutex> lock(addresses_mu_);
    auto it = addresses_.find(peer->endpoint);
    if (it != addresses_.end() && it->second == peer->address) addresses_.erase(it);
  }
  const std::set<uint64_t> ids = std::move(peer->pending);
  peer->pending.clear();
  for (uint64_t id : ids) Finish(id, status, nullptr);
}

void UcxExpertTransport::Finish(uint64_t id, absl::Status status, UcxBufferPtr reply) {
  auto it = pending_.find(id);
  if (it == pending_.end()) return;  // ended already (deadline, failure): at most once
  const std::shared_ptr<Pending> p = std::move(it->second);
  pending_.erase(it);
  if (!p->polled) {
    --unpolled_;
  } else if (status.ok()) {
    latency_ns_[1] = latency_ns_[0].load();
    latency_ns_[0] = std::chrono::duration_cast<std::chrono::nanoseconds>(
                         std::chrono::steady_clock::now() - p->sent_at)
                         .count();
  }
  auto peer = peers_.find(p->endpoint);
  if (peer != peers_.end()) peer->second->pending.erase(id);
  --in_flight_;
  p->complete(std::move(status), std::move(reply));
}

void UcxExpertTransport::OnReply(uint64_t id, int32_t code, UcxBufferPtr data) {
  if (code != 0) {
    Finish(id, absl::Status(CodeFromWire(code), std::string(data->data, data->size)), nullptr);
    return;
  }
  Finish(id, absl::OkStatus(), std::move(data));
}

int UcxExpertTransport::OnIdle() {
  if (pending_.empty()) return -1;
  const auto now = Clock::now();
  std::vector<uint64_t> expired;
  auto next = Clock::time_point::max();
  for (const auto& [id, p] : pending_) {
    if (p->deadline <= now) {
      expired.push_back(id);
    } else {
      next = std::min(next, p->deadline);
    }
  }
  for (uint64_t id : expired) {
    auto it = pending_.find(id);
    if (it == pending_.end()) continue;
    Finish(id,
           absl::DeadlineExceededError(absl::StrCat(it->second->endpoint, ": no reply by the deadline")),
           nullptr);
  }
  // Services that cannot report their own failure: ask the control plane about those
  // that calls have waited on for a while.
  for (auto& [endpoint, peer] : peers_) {
    if (peer->detects_failure || peer->ep == nullptr || peer->pending.empty()) continue;
    auto oldest = Clock::time_point::max();
    for (uint64_t id : peer->pending) {
      if (auto it = pending_.find(id); it != pending_.end()) oldest = std::min(oldest, it->second->started);
    }
    const auto due = std::max(oldest, peer->last_probe) + kProbeAfter;
    if (due <= now) {
      peer->last_probe = now;
      {
        std::lock_guard<std::mutex> lock(probe_mu_);
        probe_queue_.emplace_back(endpoint, peer->address);
      }
      probe_cv_.notify_one();
      next = std::min(next, now + kProbeAfter);
    } else {
      next = std::min(next, due);
    }
  }
  if (next == Clock::time_point::max()) return -1;
  const auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(next - now).count() + 1;
  return static_cast<int>(std::min<int64_t>(ms, 1000));
}

void UcxExpertTransport::ProbeLoop() {
  while (true) {
    std::pair<std::string, std::string> probe;
    {
      std::unique_lock<std::mutex> lock(probe_mu_);
      probe_cv_.wait(lock, [&] { return probe_stop_ || !probe_queue_.empty(); });
      if (probe_stop_) return;
      probe = std::move(probe_queue_.front());
      probe_queue_.pop_front();
    }
    ++probes_;
    const auto& [endpoint, address] = probe;
    v1::InfoResponse info;
    const absl::Status s = control_->Info(endpoint, Clock::now() + kProbeTimeout, &info);
    absl::Status failed;
    if (s.ok() && info.ucx_worker_address() != address) {
      failed = absl::UnavailableError(absl::StrCat(
          endpoint, ": the service restarted; calls to its previous instance are lost"));
    } else if (!s.ok() && s.code() != absl::StatusCode::kDeadlineExceeded) {
      failed = absl::UnavailableError(
          absl::StrCat(endpoint, ": the service is gone (its control plane: ", s.message(), ")"));
    }
    // A hung service (the probe timed out too) is left to the calls' deadlines.
    if (failed.ok()) continue;
    worker_->Post([this, endpoint = endpoint, address = address, failed] {
      auto it = peers_.find(endpoint);
      if (it == peers_.end() || it->second->address != address) return;
      FailPeer(it->second.get(), it->second->ep, failed);
    });
  }
}

// --- UcxComputeServer --------------------------------------------------------------

absl::StatusOr<std::unique_ptr<UcxComputeServer>> UcxComputeServer::Create(
    Compute compute, int threads, int max_message_bytes, std::chrono::microseconds spin) {
  auto s = std::unique_ptr<UcxComputeServer>(new UcxComputeServer());
  s->compute_ = std::move(compute);
  s->max_message_bytes_ = max_message_bytes;
  auto worker = UcxWorkerThread::Create("expert service");
  if (!worker.ok()) return worker.status();
  s->worker_ = *std::move(worker);
  for (auto [id, cb] : {std::pair{kRequestAm, &UcxCallbacks::OnRequest},
                        std::pair{kHelloAm, &UcxCallbacks::OnHello}}) {
    if (absl::Status st = SetHandler(s->worker_->worker(), id, cb, s.get()); !st.ok()) return st;
  }
  // Polls on after a message only while no compute thread works (those need the cores)
  // and requests come closer together than the spin (one of the last two gaps).
  s->worker_->SetLinger(spin, [raw = s.get(), spin] {
    return raw->working_.load() == 0 && std::min(raw->gaps_[0], raw->gaps_[1]) < spin;
  });
  s->worker_->SetAfterProgress([raw = s.get()] { raw->ServeInline(); });
  s->worker_->Start();
  for (int i = 0; i < std::max(threads, 1); ++i) {
    s->threads_.emplace_back([raw = s.get()] {
      pthread_setname_np(pthread_self(), "ucx-compute");
      raw->ComputeLoop();
    });
  }
  return s;
}

UcxComputeServer::~UcxComputeServer() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  for (auto& t : threads_) t.join();  // the queued requests are answered first
  closing_ = true;
  worker_->Post([this] {
    for (auto& [id, client] : clients_) {
      if (client->ep != nullptr) CloseEndpoint(client->ep);
      client->ep = nullptr;
    }
  });
  worker_->Stop();
  worker_.reset();
}

void UcxComputeServer::Enqueue(Job job, bool may_inline) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (may_inline && !stop_ && busy_ == 0 && jobs_.empty() && inline_jobs_.empty() &&
        worker_->on_worker_thread()) {
      // Small, and nothing else to compute: the worker thread computes it after this
      // round of progress (no hand-off, no wakeup).
      inline_jobs_.push_back(std::move(job));
      has_inline_ = true;
      return;
    }
    jobs_.push_back(std::move(job));
    ++working_;
  }
  cv_.notify_one();
}

void UcxComputeServer::Arrived() {
  const auto now = std::chrono::steady_clock::now();
  gaps_[1] = gaps_[0];
  gaps_[0] = now - last_arrival_;
  last_arrival_ = now;
}

void UcxComputeServer::ServeInline() {
  if (!has_inline_.load()) return;
  std::deque<Job> jobs;
  {
    std::lock_guard<std::mutex> lock(mu_);
    jobs.swap(inline_jobs_);
    has_inline_ = false;
  }
  for (Job& job : jobs) {
    ++computed_inline_;
    Send(Serve(std::move(job), inline_request_, inline_response_, inline_rows_));
  }
}

absl::Status UcxComputeServer::ParseSegmented(const UcxBuffer& in, v1::ComputeRequest* request,
                                              UcxRows* rows) {
  const auto malformed = [&](absl::string_view why) {
    return absl::InvalidArgumentError(absl::StrCat("malformed UCX request (", in.size, " bytes): ", why));
  };
  SegmentsPrefix prefix;
  if (in.size < sizeof prefix) return malformed("shorter than its prefix");
  std::memcpy(&prefix, in.data, sizeof prefix);
  const uint64_t head = Aligned(sizeof prefix + uint64_t{8} * prefix.count + prefix.envelope);
  if (prefix.count > in.size / 8 || head > in.size) return malformed("prefix beyond the data");
  const char* lengths = in.data + sizeof prefix;
  const char* envelope = lengths + uint64_t{8} * prefix.count;
  if (!request->ParseFromArray(envelope, static_cast<int>(prefix.envelope))) {
    return malformed("the request does not parse");
  }
  if (request->batches_size() != static_cast<int>(prefix.count)) {
    return malformed(absl::StrCat(prefix.count, " segments for ", request->batches_size(), " batches"));
  }
  uint64_t at = head;
  for (uint32_t i = 0; i < prefix.count; ++i) {
    uint64_t n;
    std::memcpy(&n, lengths + 8 * i, sizeof n);
    if (n > in.size - at) return malformed(absl::StrCat("segment ", i, " runs past the end"));
    rows->emplace_back(in.data + at, n);
    at = std::min<uint64_t>(at + Aligned(n), in.size);
  }
  if (at != in.size) return malformed(absl::StrCat(in.size - at, " bytes after the last segment"));
  return absl::OkStatus();
}

void UcxComputeServer::ComputeLoop() {
  v1::ComputeRequest request;
  v1::ComputeResponse response;
  UcxRows rows;
  while (true) {
    Job job;
    {
      std::unique_lock<std::mutex> lock(mu_);
      cv_.wait(lock, [&] { return stop_ || !jobs_.empty(); });
      if (jobs_.empty()) return;
      job = std::move(jobs_.front());
      jobs_.pop_front();
      ++busy_;
    }
    Answer answer = Serve(std::move(job), request, response, rows);
    {
      // Idle before the reply goes: the next request, which may follow it at once,
      // finds this thread free.
      std::lock_guard<std::mutex> lock(mu_);
      --busy_;
      --working_;
    }
    Send(std::move(answer));
  }
}

UcxComputeServer::Answer UcxComputeServer::Serve(Job job, v1::ComputeRequest& request,
                                                 v1::ComputeResponse& response, UcxRows& rows) {
  request.Clear();
  response.Clear();
  rows.clear();
  absl::Status status = job.format == kSegmented ? ParseSegmented(*job.payload, &request, &rows)
                        : job.format == kPlain
                            ? (request.ParseFromArray(job.payload->data, static_cast<int>(job.payload->size))
                                   ? absl::OkStatus()
                                   : absl::InvalidArgumentError(
                                         "the UCX request does not parse as a ComputeRequest"))
                            : absl::InvalidArgumentError(
                                  absl::StrCat("unknown UCX request format ", job.format));
  if (status.ok()) status = compute_(request, rows, &response);
  job.payload.reset();
  const size_t size = status.ok() ? response.ByteSizeLong() : status.message().size();
  UcxBufferPtr out = worker_->buffers().Take(size);
  int32_t code = static_cast<int32_t>(status.code());
  if (out == nullptr) {
    const std::string message = absl::StrCat("no memory for a reply of ", size, " bytes");
    out = worker_->buffers().Take(message.size());
    if (out != nullptr) std::memcpy(out->data, message.data(), message.size());
    code = static_cast<int32_t>(absl::StatusCode::kResourceExhausted);
  } else if (status.ok()) {
    response.SerializeWithCachedSizesToArray(reinterpret_cast<uint8_t*>(out->data));
  } else {
    std::memcpy(out->data, status.message().data(), size);
  }
  return {job.client, job.id, code, std::move(out)};
}

void UcxComputeServer::Send(Answer answer) {
  // Sent from this thread, holding the worker: no hand-off on the way back.
  worker_->RunLocked([&] { Reply(answer.client, answer.id, answer.code, std::move(answer.payload)); });
}

void UcxComputeServer::Hello(uint64_t id, std::string address) {
  std::unique_ptr<Client>& client = clients_[id];
  if (client == nullptr) {
    client = std::make_unique<Client>();
    client->owner = this;
    client->id = id;
  }
  if (client->ep != nullptr && client->address == address) return;  // a reconnect: same client
  if (client->ep != nullptr) {
    CloseEndpoint(client->ep);
    client->ep = nullptr;
    --clients_count_;
  }
  bool detects_failure;
  if (CreateEndpoint(worker_->worker(), address, &UcxCallbacks::ClientFailed, client.get(),
                     &client->ep, &detects_failure) != UCS_OK) {
    return;  // its requests are dropped; it sees deadlines pass
  }
  client->address = std::move(address);
  client->copy_large = InspectLanes(client->ep).shared_memory_only;
  ++clients_count_;
}

void UcxComputeServer::Reply(uint64_t client_id, uint64_t id, int32_t code, UcxBufferPtr payload,
                             bool deferred) {
  auto it = clients_.find(client_id);
  if (it == clients_.end() && !deferred) {
    // A new client's hello is handled by posted work (its endpoint back is made
    // outside the AM callback): the reply queues up behind it.
    worker_->Post([this, client_id, id, code, out = std::make_shared<UcxBufferPtr>(std::move(payload))] {
      Reply(client_id, id, code, std::move(*out), true);
    });
    return;
  }
  --in_flight_;
  if (it == clients_.end() || it->second->ep == nullptr) {
    ++dropped_;  // no way back to it
    return;
  }
  auto* out = new UcxCallbacks::OutgoingReply{{kMagic, id, code, 0}, std::move(payload)};
  const void* data = out->payload != nullptr ? out->payload->data : nullptr;
  const size_t size = out->payload != nullptr ? out->payload->size : 0;
  ucp_request_param_t prm =
      SendParams(&UcxCallbacks::ReplySent, out, 0,
                 out->payload != nullptr ? worker_->buffers().Register(*out->payload) : nullptr);
  size_t count = size;
  if (it->second->copy_large && size > kUcxInlineBytes) {
    // As a large request over shared memory (StartOnWorker): UCX's pipelined copy.
    out->iov = {const_cast<void*>(data), size};
    AsIov(prm);
    data = &out->iov;
    count = 1;
  }
  const ucs_status_ptr_t req =
      ucp_am_send_nbx(it->second->ep, kReplyAm, &out->header, sizeof out->header, data, count, &prm);
  if (req == nullptr || UCS_PTR_IS_ERR(req)) {
    delete out;  // sent in place, or the client is gone
  } else if (!worker_->on_worker_thread()) {
    worker_->Wake();  // the rest goes on in its progress
  }
}

}  // namespace moemesh
