#include "services/transport/ucx/worker_thread.h"

#include <pthread.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <ucp/api/ucp.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <cstring>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "services/transport/ucx/ucp_helpers.h"

namespace moemesh {
namespace {

// UCX's shared-memory fragment (FIFO element) size unless the environment sets one:
// 32 KiB of payload plus the 64 bytes of headers UCX's own 8256 default allows.
constexpr char kPosixSegSize[] = "32832";

// While callers poll, the worker thread looks at least this often (posted work and
// Wake come sooner); it sleeps armed once nobody has polled for this long.
constexpr auto kParked = std::chrono::milliseconds(2);

}  // namespace

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
  if (s != UCS_OK) return ucx::UcsError("ucp_config_read", s);
  // Shared memory moves our large payloads by UCX's pipelined copy through its FIFO (see
  // UcxExpertTransport::StartOnWorker); fragments of 32 KiB instead of UCX's 8 KiB cut the
  // per-fragment work (2 MiB requests: median 10.6 -> 16.8 GB/s on the benchmark VM, UCX
  // 1.13.1; 64 KiB trips an assertion in UCX 1.13's rendezvous). "MM_SEG_SIZE" is how
  // ucp_config_modify names the shared-memory transports' UCX_POSIX_SEG_SIZE and
  // UCX_SYSV_SEG_SIZE. Only a default: either in the environment wins, as all of UCX's
  // environment does. UCX warns about a setting no transport took, so it is set only where
  // UCX_TLS leaves shared memory in.
  if (std::getenv("UCX_POSIX_SEG_SIZE") == nullptr && std::getenv("UCX_SYSV_SEG_SIZE") == nullptr &&
      UcxTlsMayUseSharedMemory(std::getenv("UCX_TLS"))) {
    ucp_config_modify(config, "MM_SEG_SIZE", kPosixSegSize);
  }
  ucp_params_t params{};
  params.field_mask = UCP_PARAM_FIELD_FEATURES;
  params.features = UCP_FEATURE_AM | UCP_FEATURE_WAKEUP;
  s = ucp_init(&params, config, &w->context_);
  ucp_config_release(config);
  if (s != UCS_OK) return ucx::UcsError(absl::StrCat(name, ": ucp_init"), s);
  ucp_context_attr_t attr{};
  attr.field_mask = UCP_ATTR_FIELD_MEMORY_TYPES;
  if (ucp_context_query(w->context_, &attr) == UCS_OK) w->memory_types_ = attr.memory_types;
  w->buffers_ = std::make_shared<UcxBufferPool>(w->context_);
  ucp_worker_params_t wp{};
  wp.field_mask = UCP_WORKER_PARAM_FIELD_THREAD_MODE;
  wp.thread_mode = UCS_THREAD_MODE_SERIALIZED;  // one thread at a time: under ucx_mu_
  s = ucp_worker_create(w->context_, &wp, &w->worker_);
  if (s != UCS_OK) return ucx::UcsError(absl::StrCat(name, ": ucp_worker_create"), s);
  ucp_address_t* address = nullptr;
  size_t length = 0;
  s = ucp_worker_get_address(w->worker_, &address, &length);
  if (s != UCS_OK) return ucx::UcsError(absl::StrCat(name, ": ucp_worker_get_address"), s);
  w->address_.assign(reinterpret_cast<const char*>(address), length);
  ucp_worker_release_address(w->worker_, address);
  s = ucp_worker_get_efd(w->worker_, &w->worker_fd_);
  if (s != UCS_OK) return ucx::UcsError(absl::StrCat(name, ": ucp_worker_get_efd"), s);
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
    MutexLock lock(&mu_);
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
    MutexLock lock(&mu_);
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
      MutexLock lock(&mu_);
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
    MutexLock lock(&mu_);  // or parked while a poller polls
    woken_ = true;
  }
  park_cv_.Signal();
}

void UcxWorkerThread::WakeIfParked() {
  {
    MutexLock lock(&mu_);
    if (!parked_) return;
    woken_ = true;
  }
  park_cv_.Signal();
}

bool UcxWorkerThread::Poll(const std::function<bool()>& ready, std::chrono::nanoseconds spin) {
  if (spin.count() <= 0 || on_worker_thread()) return ready();
  int none = 0;
  if (!pollers_.compare_exchange_strong(none, 1)) return ready();  // another thread polls
  polls_.fetch_add(1, std::memory_order_relaxed);
  const auto end = std::chrono::steady_clock::now() + spin;
  bool done;
  while (!(done = ready()) && std::chrono::steady_clock::now() < end) {
    if (ucx_mu_.TryLock()) {
      RunPostedAndProgress();
      ucx_mu_.Unlock();
    }
  }
  bool wake;
  {
    MutexLock lock(&mu_);
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
  auto last_active = std::chrono::steady_clock::now();
  uint64_t polls_seen = 0;
  while (true) {
    if (BeginRound()) {
      // Last rounds: endpoints closed by the posted work finish closing, and the
      // operations they cancel complete.
      MutexLock lock(&ucx_mu_);
      for (int i = 0; i < 100 && ucp_worker_progress(worker_) != 0; ++i) {
      }
      break;
    }
    bool active = false;
    const int timeout_ms = RunUntilIdle(&active);
    if (after_progress_) after_progress_();
    const auto now = std::chrono::steady_clock::now();
    if (active) last_active = now;
    const uint64_t polls = polls_.load(std::memory_order_relaxed);
    if ((pollers_.load() > 0 || polls != polls_seen) && (!park_while_ || park_while_())) {
      // Callers poll the worker (now, or lately: a burst of calls): leave it unarmed, so
      // that no peer signals and nobody is woken per message.
      polls_seen = polls;
      Park(timeout_ms);
      continue;
    }
    polls_seen = polls;
    if (HasPostedOrStop()) continue;
    // Lately busy: poll a while longer before sleeping (the next message of a burst is
    // then taken without a wakeup).
    if (now - last_active < linger_ && (!linger_while_ || linger_while_())) continue;
    Sleep(timeout_ms);
  }
}

bool UcxWorkerThread::BeginRound() {
  MutexLock lock(&mu_);
  woken_ = false;
  return stop_ && posted_.empty();
}

int UcxWorkerThread::RunUntilIdle(bool* active) {
  MutexLock lock(&ucx_mu_);
  while (RunPostedAndProgress()) *active = true;
  const int timeout_ms = idle_hook_ ? idle_hook_() : -1;
  wake_at_ = timeout_ms < 0
                 ? std::chrono::steady_clock::time_point::max()
                 : std::chrono::steady_clock::now() + std::chrono::milliseconds(timeout_ms);
  return timeout_ms;
}

void UcxWorkerThread::Park(int timeout_ms) {
  const auto wait = timeout_ms < 0 ? kParked
                                   : std::min<std::chrono::steady_clock::duration>(
                                         kParked, std::chrono::milliseconds(timeout_ms));
  MutexLock lock(&mu_);
  const auto deadline = std::chrono::steady_clock::now() + wait;
  parked_ = true;
  while (posted_.empty() && !stop_ && !woken_) {
    if (park_cv_.WaitWithDeadline(&mu_, deadline)) break;  // timed out
  }
  parked_ = false;
}

bool UcxWorkerThread::HasPostedOrStop() {
  MutexLock lock(&mu_);
  return !posted_.empty() || stop_;
}

void UcxWorkerThread::Sleep(int timeout_ms) {
  {
    MutexLock lock(&ucx_mu_);
    if (ucp_worker_arm(worker_) == UCS_ERR_BUSY) return;
  }
  epoll_event events[2];
  ::epoll_wait(epoll_fd_, events, 2, timeout_ms);
  uint64_t count;
  (void)!::read(event_fd_, &count, sizeof count);
}

}  // namespace moemesh
