#include "services/ucx_transport.h"

#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <ucp/api/ucp.h>
#include <unistd.h>

#include <cstring>
#include <set>

#include "absl/strings/str_cat.h"

namespace moemesh {
namespace {

constexpr uint16_t kRequestAm = 1;
constexpr uint16_t kReplyAm = 2;
constexpr uint64_t kMagic = 0x314873654d656f4dULL;  // "MoeMesh1"

struct RequestHeader {
  uint64_t magic;
  uint64_t id;
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

// A received payload: eager data copied out of UCX's buffer, or a rendezvous target
// (not zero-filled: megabytes of page faults for nothing).
struct Bytes {
  std::unique_ptr<char[]> data;
  size_t size = 0;
  static Bytes Copy(const void* from, size_t n) {
    Bytes b = Uninitialized(n);
    if (n > 0) std::memcpy(b.data.get(), from, n);
    return b;
  }
  static Bytes Uninitialized(size_t n) {
    return {std::unique_ptr<char[]>(new char[n == 0 ? 1 : n]), n};
  }
};

// Frees a UCX request handle; the operation's callback still runs at completion.
void Release(ucs_status_ptr_t request) {
  if (UCS_PTR_IS_PTR(request)) ucp_request_free(request);
}

}  // namespace

// --- UcxWorkerThread ---------------------------------------------------------------

absl::StatusOr<std::unique_ptr<UcxWorkerThread>> UcxWorkerThread::Create(const std::string& name) {
  auto w = std::unique_ptr<UcxWorkerThread>(new UcxWorkerThread());
  ucp_config_t* config = nullptr;
  ucs_status_t s = ucp_config_read(nullptr, nullptr, &config);  // UCX_* from the environment
  if (s != UCS_OK) return UcsError("ucp_config_read", s);
  ucp_params_t params{};
  params.field_mask = UCP_PARAM_FIELD_FEATURES;
  params.features = UCP_FEATURE_AM | UCP_FEATURE_WAKEUP;
  s = ucp_init(&params, config, &w->context_);
  ucp_config_release(config);
  if (s != UCS_OK) return UcsError(absl::StrCat(name, ": ucp_init"), s);
  ucp_worker_params_t wp{};
  wp.field_mask = UCP_WORKER_PARAM_FIELD_THREAD_MODE;
  wp.thread_mode = UCS_THREAD_MODE_SINGLE;  // only the worker thread touches it
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
  thread_ = std::thread([this] { Loop(); });
}

UcxWorkerThread::~UcxWorkerThread() {
  if (thread_.joinable()) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
    }
    const uint64_t one = 1;
    (void)!::write(event_fd_, &one, sizeof one);
    thread_.join();
  }
  if (worker_ != nullptr) ucp_worker_destroy(worker_);
  if (context_ != nullptr) ucp_cleanup(context_);
  if (epoll_fd_ >= 0) ::close(epoll_fd_);
  if (event_fd_ >= 0) ::close(event_fd_);
}

void UcxWorkerThread::Post(std::function<void()> fn) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    posted_.push_back(std::move(fn));
  }
  const uint64_t one = 1;
  (void)!::write(event_fd_, &one, sizeof one);
}

void UcxWorkerThread::Loop() {
  while (true) {
    std::deque<std::function<void()>> work;
    {
      std::lock_guard<std::mutex> lock(mu_);
      work.swap(posted_);
      if (stop_ && work.empty()) break;
    }
    for (auto& fn : work) fn();
    while (ucp_worker_progress(worker_) != 0) {
    }
    const int timeout_ms = idle_hook_ ? idle_hook_() : -1;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (!posted_.empty() || stop_) continue;
    }
    // Sleep until the network or another thread has something for us.
    if (ucp_worker_arm(worker_) == UCS_ERR_BUSY) continue;
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
  std::string endpoint, address;
  Clock::time_point deadline;
  Complete complete;
  // UCX reads both until the send completes (UCX 1.13 does not copy the header).
  RequestHeader header{};
  std::string payload;  // the serialized request
};

struct UcxExpertTransport::Peer {
  UcxExpertTransport* owner = nullptr;
  std::string endpoint;
  ucp_ep_h ep = nullptr;
  bool detects_failure = true;  // connected with UCP_ERR_HANDLING_MODE_PEER
  std::set<uint64_t> pending;   // calls in flight to it
};

struct UcxCallbacks {
  // A rendezvous message (`desc` from an AM callback, which then returns UCS_INPROGRESS)
  // fetched into `buffer` once that callback has returned; `done` runs with the outcome.
  static void ReceiveRendezvous(UcxWorkerThread& worker, void* desc, void* buffer, size_t length,
                                ucp_am_recv_data_nbx_callback_t done, void* user_data) {
    worker.Post([w = worker.worker(), desc, buffer, length, done, user_data] {
      ucp_request_param_t prm{};
      prm.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA;
      prm.cb.recv_am = done;
      prm.user_data = user_data;
      const ucs_status_ptr_t req = ucp_am_recv_data_nbx(w, desc, buffer, length, &prm);
      if (req == nullptr) {
        done(nullptr, UCS_OK, length, user_data);
      } else if (UCS_PTR_IS_ERR(req)) {
        done(nullptr, UCS_PTR_STATUS(req), 0, user_data);
      } else {
        Release(req);
      }
    });
  }

  // Client: a request's send finished (the payload may go).
  static void RequestSent(void*, ucs_status_t status, void* user_data) {
    auto* holder = static_cast<std::shared_ptr<UcxExpertTransport::Pending>*>(user_data);
    const auto p = *holder;
    delete holder;
    if (status == UCS_OK || status == UCS_ERR_CANCELED || p->owner->closing_.load()) return;
    // A failing endpoint completes its sends from UCX's async thread: the call ends on
    // the worker thread.
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
      if (peer->ep != ep) return;  // an endpoint already replaced
      peer->owner->FailPeer(peer->endpoint,
                            absl::UnavailableError(absl::StrCat(
                                peer->endpoint, ": connection failed (", ucs_status_string(status), ")")));
    });
  }

  struct ReplyRecv {
    UcxExpertTransport* owner;
    ReplyHeader header;
    Bytes bytes;
  };

  static void ReplyReceived(void*, ucs_status_t status, size_t length, void* user_data) {
    std::unique_ptr<ReplyRecv> r(static_cast<ReplyRecv*>(user_data));
    if (status != UCS_OK) {
      r->owner->Finish(r->header.id,
                       absl::UnavailableError(absl::StrCat("reply transfer failed (",
                                                           ucs_status_string(status), ")")),
                       nullptr);
      return;
    }
    r->owner->OnReply(r->header.id, r->header.code, r->bytes.data.get(), length);
  }

  // Client: AM 2, a reply.
  static ucs_status_t OnReply(void* arg, const void* header, size_t header_length, void* data,
                              size_t length, const ucp_am_recv_param_t* param) {
    auto* t = static_cast<UcxExpertTransport*>(arg);
    ReplyHeader h;
    if (header_length != sizeof h) return UCS_OK;  // not ours: dropped
    std::memcpy(&h, header, sizeof h);
    if (h.magic != kMagic) return UCS_OK;
    if ((param->recv_attr & UCP_AM_RECV_ATTR_FLAG_RNDV) == 0) {
      t->OnReply(h.id, h.code, static_cast<const char*>(data), length);
      return UCS_OK;
    }
    auto* r = new ReplyRecv{t, h, Bytes::Uninitialized(length)};
    ReceiveRendezvous(*t->worker_, data, r->bytes.data.get(), length, &ReplyReceived, r);
    return UCS_INPROGRESS;
  }

  struct RequestRecv {
    UcxComputeServer* owner;
    ucp_ep_h reply_ep;
    uint64_t id;
    Bytes bytes;
  };

  static void RequestReceived(void*, ucs_status_t status, size_t, void* user_data) {
    std::unique_ptr<RequestRecv> r(static_cast<RequestRecv*>(user_data));
    if (status != UCS_OK) {
      --r->owner->in_flight_;
      return;  // the client is gone; nothing to answer
    }
    r->owner->Enqueue({r->reply_ep, r->id, {std::move(r->bytes.data), r->bytes.size}});
  }

  // Server: AM 1, a request.
  static ucs_status_t OnRequest(void* arg, const void* header, size_t header_length, void* data,
                                size_t length, const ucp_am_recv_param_t* param) {
    auto* server = static_cast<UcxComputeServer*>(arg);
    RequestHeader h;
    const bool rndv = (param->recv_attr & UCP_AM_RECV_ATTR_FLAG_RNDV) != 0;
    if (header_length != sizeof h || (param->recv_attr & UCP_AM_RECV_ATTR_FIELD_REPLY_EP) == 0) {
      if (rndv) ucp_am_data_release(server->worker_->worker(), data);
      return UCS_OK;  // no way to answer: dropped
    }
    std::memcpy(&h, header, sizeof h);
    if (h.magic != kMagic) {
      if (rndv) ucp_am_data_release(server->worker_->worker(), data);
      return UCS_OK;
    }
    ++server->in_flight_;
    if (length > static_cast<size_t>(server->max_message_bytes_)) {
      if (rndv) ucp_am_data_release(server->worker_->worker(), data);
      server->Reply(param->reply_ep, h.id, static_cast<int32_t>(absl::StatusCode::kResourceExhausted),
                    absl::StrCat("request of ", length, " bytes is over the limit of ",
                                 server->max_message_bytes_));
      return UCS_OK;
    }
    if (!rndv) {
      Bytes b = Bytes::Copy(data, length);
      server->Enqueue({param->reply_ep, h.id, {std::move(b.data), b.size}});
      return UCS_OK;
    }
    auto* r = new RequestRecv{server, param->reply_ep, h.id, Bytes::Uninitialized(length)};
    ReceiveRendezvous(*server->worker_, data, r->bytes.data.get(), length, &RequestReceived, r);
    return UCS_INPROGRESS;
  }

  // A reply's header and payload, alive until its send completes.
  struct OutgoingReply {
    ReplyHeader header;
    std::string payload;
  };
  static void ReplySent(void*, ucs_status_t, void* user_data) {
    delete static_cast<OutgoingReply*>(user_data);
  }
};

namespace {

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

}  // namespace

// --- UcxExpertTransport ------------------------------------------------------------

UcxExpertTransport::UcxExpertTransport(std::shared_ptr<ExpertTransport> control,
                                       int max_message_bytes)
    : control_(std::move(control)), max_message_bytes_(max_message_bytes) {}

absl::StatusOr<std::shared_ptr<UcxExpertTransport>> UcxExpertTransport::Create(
    std::shared_ptr<ExpertTransport> control, int max_message_bytes) {
  auto t = std::shared_ptr<UcxExpertTransport>(
      new UcxExpertTransport(std::move(control), max_message_bytes));
  auto worker = UcxWorkerThread::Create("router");
  if (!worker.ok()) return worker.status();
  t->worker_ = *std::move(worker);
  if (absl::Status s = SetHandler(t->worker_->worker(), kReplyAm, &UcxCallbacks::OnReply, t.get());
      !s.ok()) {
    return s;
  }
  t->worker_->SetIdleHook([raw = t.get()] { return raw->ExpireDeadlines(); });
  t->worker_->Start();
  return t;
}

UcxExpertTransport::~UcxExpertTransport() {
  if (worker_ == nullptr) return;
  closing_ = true;
  worker_->Post([this] {
    std::vector<uint64_t> ids;
    for (const auto& [id, p] : pending_) ids.push_back(id);
    for (uint64_t id : ids) Finish(id, absl::CancelledError("the UCX transport is shutting down"), nullptr);
    for (auto& [endpoint, peer] : peers_) {
      if (peer->ep == nullptr) continue;
      ucp_request_param_t prm{};
      prm.op_attr_mask = UCP_OP_ATTR_FIELD_FLAGS;
      prm.flags = UCP_EP_CLOSE_FLAG_FORCE;
      Release(ucp_ep_close_nbx(peer->ep, &prm));
      peer->ep = nullptr;
    }
  });
  worker_.reset();
}

std::unique_ptr<ExpertTransport::Exchange> UcxExpertTransport::NewExchange(Clock::time_point deadline) {
  return std::make_unique<QueuedExchange>(
      [this, deadline](const std::string& endpoint, std::unique_ptr<v1::ComputeRequest> request,
                       QueuedExchange::Complete complete) {
        Send(endpoint, std::move(request), deadline, std::move(complete));
      });
}

absl::Status UcxExpertTransport::Info(const std::string& endpoint, Clock::time_point deadline,
                                      v1::InfoResponse* response) {
  return control_->Info(endpoint, deadline, response);
}

void UcxExpertTransport::Send(const std::string& endpoint,
                              std::unique_ptr<v1::ComputeRequest> request,
                              Clock::time_point deadline, Complete complete) {
  // The service's worker address, from Info on first use (and after a failure).
  std::string address;
  {
    std::lock_guard<std::mutex> lock(addresses_mu_);
    auto it = addresses_.find(endpoint);
    if (it != addresses_.end()) address = it->second;
  }
  if (address.empty()) {
    v1::InfoResponse info;
    const absl::Status s = control_->Info(endpoint, deadline, &info);
    if (!s.ok()) {
      complete(absl::Status(s.code(), absl::StrCat(endpoint, ": ", s.message())), nullptr);
      return;
    }
    if (info.ucx_worker_address().empty()) {
      complete(absl::UnavailableError(absl::StrCat(
                   endpoint, " serves no UCX data plane (start it with --transport ucx)")),
               nullptr);
      return;
    }
    address = info.ucx_worker_address();
    std::lock_guard<std::mutex> lock(addresses_mu_);
    addresses_[endpoint] = address;
  }
  auto p = std::make_shared<Pending>();
  p->owner = this;
  p->id = next_id_++;
  p->endpoint = endpoint;
  p->address = std::move(address);
  p->deadline = deadline;
  p->complete = std::move(complete);
  const size_t size = request->ByteSizeLong();
  if (size > static_cast<size_t>(max_message_bytes_)) {
    p->complete(absl::ResourceExhaustedError(absl::StrCat(endpoint, ": request of ", size,
                                                          " bytes is over the limit of ",
                                                          max_message_bytes_)),
                nullptr);
    return;
  }
  p->payload.resize(size);
  request->SerializeWithCachedSizesToArray(reinterpret_cast<uint8_t*>(p->payload.data()));
  ++in_flight_;
  worker_->Post([this, p] { StartOnWorker(p->id, p); });
}

ucp_ep_h UcxExpertTransport::Connect(const std::string& endpoint, std::string* error) {
  std::unique_ptr<Peer>& peer = peers_[endpoint];
  if (peer == nullptr) {
    peer = std::make_unique<Peer>();
    peer->owner = this;
    peer->endpoint = endpoint;
  }
  if (peer->ep != nullptr) return peer->ep;
  std::string address;
  {
    std::lock_guard<std::mutex> lock(addresses_mu_);
    address = addresses_[endpoint];
  }
  if (address.empty()) {
    *error = "its UCX address is unknown (it failed; retry)";
    return nullptr;
  }
  ucp_ep_params_t params{};
  params.field_mask = UCP_EP_PARAM_FIELD_REMOTE_ADDRESS | UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE |
                      UCP_EP_PARAM_FIELD_ERR_HANDLER;
  params.address = reinterpret_cast<const ucp_address_t*>(address.data());
  params.err_mode = UCP_ERR_HANDLING_MODE_PEER;
  params.err_handler.cb = &UcxCallbacks::PeerFailed;
  params.err_handler.arg = peer.get();
  ucs_status_t s = ucp_ep_create(worker_->worker(), &params, &peer->ep);
  if (s == UCS_ERR_UNREACHABLE) {
    // Transports without peer-failure detection (UCX 1.13's shared memory) are left out
    // in PEER mode. Connect without it: a dead peer then shows as a missed deadline,
    // which the caller turns into UNAVAILABLE when the service's gRPC side is gone too.
    params.field_mask &= ~(UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE | UCP_EP_PARAM_FIELD_ERR_HANDLER);
    s = ucp_ep_create(worker_->worker(), &params, &peer->ep);
    peer->detects_failure = false;
  }
  if (s != UCS_OK) {
    peer->ep = nullptr;
    *error = absl::StrCat("cannot connect over UCX: ", ucs_status_string(s));
    std::lock_guard<std::mutex> lock(addresses_mu_);
    addresses_.erase(endpoint);
    return nullptr;
  }
  return peer->ep;
}

void UcxExpertTransport::StartOnWorker(uint64_t id, std::shared_ptr<Pending> p) {
  pending_[id] = p;
  std::string error;
  ucp_ep_h ep = Connect(p->endpoint, &error);
  if (ep == nullptr) {
    Finish(id, absl::UnavailableError(absl::StrCat(p->endpoint, ": ", error)), nullptr);
    return;
  }
  peers_[p->endpoint]->pending.insert(id);
  p->header = {kMagic, id};
  auto* holder = new std::shared_ptr<Pending>(p);  // keeps header and payload until sent
  ucp_request_param_t prm{};
  prm.op_attr_mask =
      UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA | UCP_OP_ATTR_FIELD_FLAGS;
  prm.flags = UCP_AM_SEND_FLAG_REPLY | UCP_AM_SEND_FLAG_EAGER;
  prm.cb.send = &UcxCallbacks::RequestSent;
  prm.user_data = holder;
  const ucs_status_ptr_t req = ucp_am_send_nbx(ep, kRequestAm, &p->header, sizeof p->header,
                                               p->payload.data(), p->payload.size(), &prm);
  if (req == nullptr) {
    delete holder;  // sent in place
  } else if (UCS_PTR_IS_ERR(req)) {
    delete holder;
    Finish(id,
           absl::UnavailableError(absl::StrCat(p->endpoint, ": send failed (",
                                               ucs_status_string(UCS_PTR_STATUS(req)), ")")),
           nullptr);
  } else {
    Release(req);
  }
}

void UcxExpertTransport::FailPeer(const std::string& endpoint, const absl::Status& status) {
  auto it = peers_.find(endpoint);
  if (it == peers_.end()) return;
  Peer& peer = *it->second;
  if (peer.ep != nullptr) {
    // Closed after this callback returns; the next call connects afresh.
    worker_->Post([ep = peer.ep] {
      ucp_request_param_t prm{};
      prm.op_attr_mask = UCP_OP_ATTR_FIELD_FLAGS;
      prm.flags = UCP_EP_CLOSE_FLAG_FORCE;
      Release(ucp_ep_close_nbx(ep, &prm));
    });
    peer.ep = nullptr;
  }
  {
    // A restarted service has a new worker address: ask Info again.
    std::lock_guard<std::mutex> lock(addresses_mu_);
    addresses_.erase(endpoint);
  }
  const std::set<uint64_t> ids = std::move(peer.pending);
  peer.pending.clear();
  for (uint64_t id : ids) Finish(id, status, nullptr);
}

void UcxExpertTransport::Finish(uint64_t id, absl::Status status,
                                std::unique_ptr<v1::ComputeResponse> response) {
  auto it = pending_.find(id);
  if (it == pending_.end()) return;  // ended already (deadline, failure): at most once
  const std::shared_ptr<Pending> p = std::move(it->second);
  pending_.erase(it);
  auto peer = peers_.find(p->endpoint);
  if (peer != peers_.end()) peer->second->pending.erase(id);
  --in_flight_;
  p->complete(std::move(status), std::move(response));
}

void UcxExpertTransport::OnReply(uint64_t id, int32_t code, const char* data, size_t length) {
  auto it = pending_.find(id);
  if (it == pending_.end()) return;  // a late reply to a call that has ended: dropped
  if (code != 0) {
    const auto status_code =
        code > 0 && code <= 16 ? static_cast<absl::StatusCode>(code) : absl::StatusCode::kUnknown;
    Finish(id, absl::Status(status_code, std::string(data, length)), nullptr);
    return;
  }
  auto response = std::make_unique<v1::ComputeResponse>();
  if (!response->ParseFromArray(data, static_cast<int>(length))) {
    Finish(id, absl::InternalError(absl::StrCat(it->second->endpoint, ": the UCX reply does not parse")),
           nullptr);
    return;
  }
  Finish(id, absl::OkStatus(), std::move(response));
}

int UcxExpertTransport::ExpireDeadlines() {
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
    const std::string endpoint = it->second->endpoint;
    Finish(id, absl::DeadlineExceededError(absl::StrCat(endpoint, ": no reply by the deadline")),
           nullptr);
    // Without failure detection a missed deadline is all a dead peer shows: connect
    // afresh (Info again) next time, so a restarted service is found.
    auto peer = peers_.find(endpoint);
    if (peer != peers_.end() && !peer->second->detects_failure && peer->second->ep != nullptr) {
      FailPeer(endpoint, absl::DeadlineExceededError(
                             absl::StrCat(endpoint, ": no reply by the deadline")));
    }
  }
  if (next == Clock::time_point::max()) return -1;
  const auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(next - now).count() + 1;
  return static_cast<int>(std::min<int64_t>(ms, 1000));
}

// --- UcxComputeServer --------------------------------------------------------------

absl::StatusOr<std::unique_ptr<UcxComputeServer>> UcxComputeServer::Create(Compute compute,
                                                                           int threads,
                                                                           int max_message_bytes) {
  auto s = std::unique_ptr<UcxComputeServer>(new UcxComputeServer());
  s->compute_ = std::move(compute);
  s->max_message_bytes_ = max_message_bytes;
  auto worker = UcxWorkerThread::Create("expert service");
  if (!worker.ok()) return worker.status();
  s->worker_ = *std::move(worker);
  if (absl::Status st = SetHandler(s->worker_->worker(), kRequestAm, &UcxCallbacks::OnRequest, s.get());
      !st.ok()) {
    return st;
  }
  s->worker_->Start();
  for (int i = 0; i < std::max(threads, 1); ++i) {
    s->threads_.emplace_back([raw = s.get()] { raw->ComputeLoop(); });
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
  worker_.reset();
}

void UcxComputeServer::Enqueue(Job job) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    jobs_.push_back(std::move(job));
  }
  cv_.notify_one();
}

void UcxComputeServer::ComputeLoop() {
  while (true) {
    Job job;
    {
      std::unique_lock<std::mutex> lock(mu_);
      cv_.wait(lock, [&] { return stop_ || !jobs_.empty(); });
      if (jobs_.empty()) return;
      job = std::move(jobs_.front());
      jobs_.pop_front();
    }
    v1::ComputeRequest request;
    v1::ComputeResponse response;
    absl::Status status;
    if (!request.ParseFromArray(job.payload.data.get(), static_cast<int>(job.payload.size))) {
      status = absl::InvalidArgumentError("the UCX request does not parse as a ComputeRequest");
    } else {
      status = compute_(request, &response);
    }
    std::string payload = status.ok() ? response.SerializeAsString() : std::string(status.message());
    worker_->Post([this, ep = job.reply_ep, id = job.id, code = static_cast<int32_t>(status.code()),
                   payload = std::move(payload)]() mutable { Reply(ep, id, code, std::move(payload)); });
  }
}

void UcxComputeServer::Reply(ucp_ep_h ep, uint64_t id, int32_t code, std::string payload) {
  --in_flight_;
  auto* out = new UcxCallbacks::OutgoingReply{{kMagic, id, code, 0}, std::move(payload)};
  ucp_request_param_t prm{};
  prm.op_attr_mask =
      UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA | UCP_OP_ATTR_FIELD_FLAGS;
  prm.flags = UCP_AM_SEND_FLAG_EAGER;
  prm.cb.send = &UcxCallbacks::ReplySent;
  prm.user_data = out;
  const ucs_status_ptr_t req = ucp_am_send_nbx(ep, kReplyAm, &out->header, sizeof out->header,
                                               out->payload.data(), out->payload.size(), &prm);
  if (req == nullptr || UCS_PTR_IS_ERR(req)) {
    delete out;  // sent in place, or the client is gone
  } else {
    Release(req);
  }
}

}  // namespace moemesh
