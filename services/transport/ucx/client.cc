#include "services/transport/ucx/client.h"

#include <pthread.h>
#include <ucp/api/ucp.h>

#include <algorithm>
#include <cstring>
#include <random>
#include <set>
#include <vector>

#include "absl/strings/str_cat.h"
#include "services/transport/queued_exchange.h"
#include "services/transport/ucx/ucp_helpers.h"

namespace moemesh {
namespace {

// How long a call may wait on a service before the control plane is asked whether it is
// still there, and still the instance the call went to, and how often after that: soon
// where the transport cannot report a dead peer (UCX 1.13's shared memory); later where it
// can (TCP, RDMA), for what it cannot see: a hung instance whose endpoint name a new one
// has taken (a restarted pod).
constexpr auto kProbeAfter = std::chrono::milliseconds(100);
constexpr auto kProbeAfterDetecting = std::chrono::milliseconds(1000);
constexpr auto kProbeTimeout = std::chrono::milliseconds(500);

char kZeros[ucx::kAlign] = {};  // padding, read by UCX

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
    return ucx::Aligned(sizeof(ucx::SegmentsPrefix) + n * sizeof(uint64_t) + 128 + n * 96);
  }

  UcxOutgoingRequest(UcxBufferPtr buffer, size_t reserve)
      : buffer_(std::move(buffer)), reserve_(reserve), at_(reserve) {}

  char* AddRows(int32_t expert, DType dtype, const std::vector<int64_t>& shape) override {
    const size_t n = AddBatch(expert, dtype, shape);
    if (at_ + ucx::Aligned(n) > buffer_->capacity) {
      // More than announced: moved to a larger buffer.
      UcxBufferPtr larger =
          buffer_->pool->Take(std::max(2 * buffer_->capacity, at_ + ucx::Aligned(n)));
      if (larger == nullptr) {
        request_.mutable_batches()->RemoveLast();
        return nullptr;
      }
      std::memcpy(larger->data + reserve_, buffer_->data + reserve_, at_ - reserve_);
      buffer_ = std::move(larger);
    }
    char* rows = buffer_->data + at_;
    std::memset(rows + n, 0, ucx::Aligned(n) - n);
    lengths_.push_back(n);
    at_ += ucx::Aligned(n);
    return rows;
  }

  std::unique_ptr<v1::ComputeRequest> TakeProto() override {
    size_t at = reserve_;
    for (int i = 0; i < request_.batches_size(); ++i) {
      request_.mutable_batches(i)->mutable_rows()->set_data(buffer_->data + at, lengths_[i]);
      at += ucx::Aligned(lengths_[i]);
    }
    return OutgoingRequest::TakeProto();
  }

  // Writes the head before the rows; the message's start, or nullptr if the head does
  // not fit in the room reserved for it.
  const char* WriteHead(size_t* size) {
    const size_t envelope = request_.ByteSizeLong();
    const size_t head = ucx::SegmentedHeadSize(lengths_.size(), envelope);
    if (head > reserve_) return nullptr;
    char* start = buffer_->data + (reserve_ - head);
    ucx::WriteSegmentedHead(
        start, lengths_.size(), [this](size_t i) { return lengths_[i]; }, request_, envelope);
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

// The router's exchange over UCX: QueuedExchange, plus requests built in registered
// buffers.
class UcxExchange final : public QueuedExchange<UcxBufferPtr> {
 public:
  using SendBuilt = std::function<void(
      const std::string& endpoint, std::unique_ptr<OutgoingRequest> request, Complete complete)>;
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

// A call: filled in by the calling thread, then used under the worker's lock (as pending_).
struct UcxExpertTransport::Pending {
  UcxExpertTransport* owner = nullptr;
  uint64_t id = 0;
  std::string endpoint;
  Clock::time_point started, deadline;
  // Its caller polls for the reply (and wakes the worker thread if it gives up).
  bool polled = false;
  std::chrono::steady_clock::time_point sent_at;
  Complete complete;
  // UCX reads both until the send completes (UCX 1.13 does not copy the header).
  ucx::RequestHeader header{};
  UcxBufferPtr payload;
  // kSegmented: the row bytes moved out of the request, sent after `payload` (which then
  // holds prefix, lengths and envelope), gathered by UCX from `iov`.
  uint32_t format = ucx::kPlain;
  std::vector<std::string> segments;
  std::vector<ucp_dt_iov_t> iov;
  // Or the caller's bytes (SendInPlace), and their memory type.
  std::shared_ptr<const void> keep;
  const void* data = nullptr;
  size_t size = 0;
  ucs_memory_type_t memory_type = UCS_MEMORY_TYPE_HOST;

  // UCX is done reading what the call sent.
  void Release() {
    payload.reset();
    keep.reset();
    segments.clear();
  }
};

// Guarded by the worker's lock, as peers_.
struct UcxExpertTransport::Peer {
  UcxExpertTransport* owner = nullptr;
  std::string endpoint;
  std::string address;  // the worker address `ep` is connected to
  ucp_ep_h ep = nullptr;
  bool detects_failure = true;  // connected with UCP_ERR_HANDLING_MODE_PEER
  bool gathers = false;         // UCX gathers iov sends to it (no packing copy here)
  bool copy_large = false;      // large payloads go as an iov (see StartOnWorker)
  ucx::HelloHeader hello{};     // read by UCX until the hello is sent
  std::set<uint64_t> pending;   // calls in flight to it
  Clock::time_point last_probe{};
};

// UCX's callbacks. AM callbacks and completions of successful operations run in the
// worker's progress, holding its lock; failures may come from UCX's async thread, so
// they hand the work on to the worker thread (Post).
struct UcxExpertTransport::Callbacks {
  static void HelloSent(void* request, ucs_status_t, void*) { ucx::FreeRequest(request); }

  // A request's send finished (the payload may go).
  static void RequestSent(void* request, ucs_status_t status, void* user_data) {
    ucx::FreeRequest(request);
    std::unique_ptr<std::shared_ptr<Pending>> holder(
        static_cast<std::shared_ptr<Pending>*>(user_data));
    const auto p = std::move(*holder);
    p->Release();
    if (status == UCS_OK || status == UCS_ERR_CANCELED || p->owner->closing_.load()) return;
    // A failing endpoint may complete its sends from UCX's async thread: the call ends
    // on the worker thread.
    p->owner->worker_->Post([p, status] {
      p->owner->worker_->mutex().AssertHeld();  // posted work
      p->owner->Finish(p->id,
                       absl::UnavailableError(absl::StrCat(p->endpoint, ": send failed (",
                                                           ucs_status_string(status), ")")),
                       nullptr);
    });
  }

  // The connection to a service failed.
  static void PeerFailed(void* arg, ucp_ep_h ep, ucs_status_t status) {
    // UCX may call this from its async thread: the work moves to the worker thread.
    auto* peer = static_cast<Peer*>(arg);
    if (peer->owner->closing_.load()) return;  // endpoints going away with the worker
    peer->owner->worker_->Post([peer, ep, status] {
      peer->owner->worker_->mutex().AssertHeld();  // posted work
      peer->owner->FailPeer(
          peer, ep,
          absl::UnavailableError(absl::StrCat(peer->endpoint, ": connection failed (",
                                              ucs_status_string(status), ")")));
    });
  }

  // kReplyAm: a reply.
  static ucs_status_t ReplyAm(void* arg, const void* header, size_t header_length, void* data,
                              size_t length, const ucp_am_recv_param_t* param) {
    auto* t = static_cast<UcxExpertTransport*>(arg);
    t->worker_->mutex().AssertHeld();  // an AM callback: in progress
    const bool rndv = (param->recv_attr & UCP_AM_RECV_ATTR_FLAG_RNDV) != 0;
    ucx::ReplyHeader h;
    if (header_length != sizeof h) return ucx::DropMessage();
    std::memcpy(&h, header, sizeof h);
    if (h.magic != ucx::kMagic || t->pending_.count(h.id) == 0) {
      return ucx::DropMessage();  // not ours, or late: dropped
    }
    UcxBufferPtr buffer = t->buffers().Take(length);
    if (buffer == nullptr) {
      t->Finish(
          h.id,
          absl::ResourceExhaustedError(absl::StrCat("no memory for a reply of ", length, " bytes")),
          nullptr);
      return ucx::DropMessage();
    }
    if (!rndv) {
      std::memcpy(buffer->data, data, length);
      t->OnReply(h.id, h.code, std::move(buffer));
      return UCS_OK;
    }
    UcxBuffer* raw = buffer.get();
    auto* r = new ReplyRecv{t, h, std::move(buffer)};
    ucx::ReceiveRendezvous(*t->worker_, data, raw, &ReplyReceived, r);
    return UCS_INPROGRESS;
  }

  // A rendezvous reply being received.
  struct ReplyRecv {
    UcxExpertTransport* owner;
    ucx::ReplyHeader header;
    UcxBufferPtr buffer;
  };

  static void ReplyReceived(void* request, ucs_status_t status, size_t, void* user_data) {
    ucx::FreeRequest(request);
    std::shared_ptr<ReplyRecv> r(static_cast<ReplyRecv*>(user_data));
    if (status == UCS_OK) {
      r->owner->worker_->mutex().AssertHeld();  // received: in progress
      r->owner->OnReply(r->header.id, r->header.code, std::move(r->buffer));
      return;
    }
    if (r->owner->closing_.load()) return;
    r->owner->worker_->Post([r, status] {
      r->owner->worker_->mutex().AssertHeld();  // posted work
      r->owner->Finish(r->header.id,
                       absl::UnavailableError(absl::StrCat("the reply's transfer failed (",
                                                           ucs_status_string(status), ")")),
                       nullptr);
    });
  }
};

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
  if (absl::Status s =
          ucx::SetHandler(t->worker_->worker(), ucx::kReplyAm, &Callbacks::ReplyAm, t.get());
      !s.ok()) {
    return s;
  }
  t->worker_->SetIdleHook([raw = t.get()] {
    raw->worker_->mutex().AssertHeld();  // the idle hook
    return raw->OnIdle();
  });
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
      MutexLock lock(&probe_mu_);
      probe_stop_ = true;
    }
    probe_cv_.SignalAll();
    prober_.join();
  }
  if (worker_ == nullptr) return;
  closing_ = true;
  worker_->Post([this] {
    worker_->mutex().AssertHeld();  // posted work
    std::vector<uint64_t> ids;
    for (const auto& [id, p] : pending_) ids.push_back(id);
    for (uint64_t id : ids) {
      Finish(id, absl::CancelledError("the UCX transport is shutting down"), nullptr);
    }
    for (auto& [endpoint, peer] : peers_) {
      if (peer->ep != nullptr) ucx::CloseEndpoint(peer->ep);
      peer->ep = nullptr;
    }
  });
  worker_->Stop();  // runs the above; callbacks during the last rounds see closing_
  worker_.reset();
}

std::unique_ptr<OutgoingRequest> UcxExpertTransport::NewRequest(size_t row_bytes, int batches) {
  const size_t reserve = UcxOutgoingRequest::HeadBound(batches);
  UcxBufferPtr buffer =
      buffers().Take(reserve + row_bytes + ucx::kAlign * static_cast<size_t>(std::max(batches, 0)));
  if (buffer == nullptr) return std::make_unique<OutgoingRequest>();
  return std::make_unique<UcxOutgoingRequest>(std::move(buffer), reserve);
}

void UcxExpertTransport::SendBuilt(const std::string& endpoint,
                                   std::unique_ptr<OutgoingRequest> request,
                                   Clock::time_point deadline, bool polled, Complete complete) {
  auto* built = dynamic_cast<UcxOutgoingRequest*>(request.get());
  size_t size = 0;
  const char* start = built != nullptr ? built->WriteHead(&size) : nullptr;
  if (start == nullptr) {  // not built here, or a head larger than its room: as a protobuf
    SendRequest(endpoint, request->TakeProto(), deadline, polled, std::move(complete));
    return;
  }
  std::shared_ptr<Pending> p = Prepare(endpoint, size, deadline, complete);
  if (p == nullptr) return;
  p->format = ucx::kSegmented;
  p->polled = polled && size <= kUcxInlineBytes;  // as SendRequest
  p->data = start;
  p->size = size;
  p->payload = built->TakeBuffer();
  Start(std::move(p));
}

std::unique_ptr<ExpertTransport::Exchange> UcxExpertTransport::NewExchange(
    Clock::time_point deadline) {
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
        if (unpolled_.load() == 0 &&
            std::min(latency_ns_[0].load(), latency_ns_[1].load()) < spin_ns) {
          worker_->Poll(ready, spin_);
        }
      });
}

absl::Status UcxExpertTransport::Info(const std::string& endpoint, const v1::InfoRequest& request,
                                      Clock::time_point deadline, v1::InfoResponse* response) {
  return control_->Info(endpoint, request, deadline, response);
}

bool UcxExpertTransport::cuda_direct() const {
  return (worker_->memory_types() & UCS_BIT(UCS_MEMORY_TYPE_CUDA)) != 0;
}

bool UcxExpertTransport::Resolve(const std::string& endpoint, Clock::time_point deadline,
                                 const Complete& complete) {
  {
    MutexLock lock(&addresses_mu_);
    if (addresses_.count(endpoint) > 0) return true;
  }
  v1::InfoRequest request;
  request.set_ucx_credential(true);
  v1::InfoResponse info;
  const absl::Status s = control_->Info(endpoint, request, deadline, &info);
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
  if (info.ucx_credential().size() != ucx::kCredentialBytes) {
    complete(absl::PermissionDeniedError(absl::StrCat(endpoint, " gave no UCX credential (",
                                                      info.ucx_credential().size(), " bytes)")),
             nullptr);
    return false;
  }
  MutexLock lock(&addresses_mu_);
  addresses_[endpoint] = {info.ucx_worker_address(), info.ucx_credential()};
  return true;
}

std::shared_ptr<UcxExpertTransport::Pending> UcxExpertTransport::Prepare(
    const std::string& endpoint, size_t size, Clock::time_point deadline, Complete& complete) {
  if (size > static_cast<size_t>(max_message_bytes_)) {
    complete(
        absl::ResourceExhaustedError(absl::StrCat(
            endpoint, ": request of ", size, " bytes is over the limit of ", max_message_bytes_)),
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
    total += ucx::Aligned(segments.back().size());
  }
  const size_t envelope = request->ByteSizeLong();
  const size_t head = ucx::SegmentedHeadSize(segments.size(), envelope);
  std::shared_ptr<Pending> p = Prepare(endpoint, total + head, deadline, complete);
  if (p == nullptr) return;
  UcxBufferPtr buffer = buffers().Take(head);
  if (buffer == nullptr) {
    p->complete(absl::ResourceExhaustedError(absl::StrCat(endpoint, ": no memory for a request")),
                nullptr);
    return;
  }
  ucx::WriteSegmentedHead(
      buffer->data, segments.size(),
      [&segments](size_t i) -> uint64_t { return segments[i].size(); }, *request, envelope);
  p->format = ucx::kSegmented;
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
  worker_->RunLocked([&] {
    worker_->mutex().AssertHeld();  // RunLocked
    StartOnWorker(p);
  });
}

void UcxExpertTransport::StartOnWorker(std::shared_ptr<Pending> p) {
  AddPending(p);
  std::string error;
  Peer* peer = Connect(p->endpoint, &error);
  if (peer == nullptr) {
    Finish(p->id, absl::UnavailableError(absl::StrCat(p->endpoint, ": ", error)), nullptr);
    return;
  }
  peer->pending.insert(p->id);
  p->header = {ucx::kMagic, p->id, client_id_, p->format, 0};
  auto* holder = new std::shared_ptr<Pending>(p);  // keeps header and payload until sent
  ucp_request_param_t prm =
      ucx::SendParams(&Callbacks::RequestSent, holder, 0, PackOrRegister(*p, *peer));
  const bool iov = DescribeAsIov(*p, *peer);
  if (iov) ucx::AsIov(prm);
  if (p->memory_type != UCS_MEMORY_TYPE_HOST) {
    prm.op_attr_mask |= UCP_OP_ATTR_FIELD_MEMORY_TYPE;
    prm.memory_type = p->memory_type;
  }
  const ucs_status_ptr_t req =
      ucp_am_send_nbx(peer->ep, ucx::kRequestAm, &p->header, sizeof p->header,
                      iov ? p->iov.data() : p->data, iov ? p->iov.size() : p->size, &prm);
  if (req == nullptr) {
    delete holder;  // sent in place
    p->Release();
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

void UcxExpertTransport::AddPending(const std::shared_ptr<Pending>& p) {
  pending_[p->id] = p;
  if (p->polled) return;
  ++unpolled_;  // the worker thread must watch the worker for it
  if (worker_->on_worker_thread()) return;
  worker_->WakeIfParked();
  // It may be asleep until later than this call's deadline (or its first probe): it
  // must look again by then. (A polled call's caller wakes it if it gives up.)
  const auto by = std::min(p->deadline, p->started + kProbeAfter);
  worker_->WakeBy(
      std::chrono::steady_clock::now() +
      std::chrono::duration_cast<std::chrono::steady_clock::duration>(by - Clock::now()));
}

UcxExpertTransport::Peer* UcxExpertTransport::Connect(const std::string& endpoint,
                                                      std::string* error) {
  std::unique_ptr<Peer>& peer = peers_[endpoint];
  if (peer == nullptr) {
    peer = std::make_unique<Peer>();
    peer->owner = this;
    peer->endpoint = endpoint;
  }
  if (peer->ep != nullptr) return peer.get();
  std::string address, credential;
  {
    MutexLock lock(&addresses_mu_);
    auto it = addresses_.find(endpoint);
    if (it != addresses_.end()) {
      address = it->second.address;
      credential = it->second.credential;
    }
  }
  if (address.empty()) {
    *error = "its UCX address is unknown (it failed; retry)";
    return nullptr;
  }
  const ucs_status_t s = ucx::CreateEndpoint(worker_->worker(), address, &Callbacks::PeerFailed,
                                             peer.get(), &peer->ep, &peer->detects_failure);
  if (s != UCS_OK) {
    *error = absl::StrCat("cannot connect over UCX: ", ucs_status_string(s));
    MutexLock lock(&addresses_mu_);
    addresses_.erase(endpoint);
    return nullptr;
  }
  peer->address = std::move(address);
  const ucx::RendezvousLanes lanes = ucx::InspectLanes(peer->ep);
  peer->gathers = lanes.remote_memory;
  peer->copy_large = lanes.shared_memory_only;
  // Introduce ourselves: the service replies on an endpoint of its own, to this worker.
  peer->hello = {ucx::kMagic, client_id_, {}};
  std::memcpy(peer->hello.credential, credential.data(), sizeof peer->hello.credential);
  ucp_request_param_t prm = ucx::SendParams(&Callbacks::HelloSent, nullptr, 0, nullptr);
  const ucs_status_ptr_t req =
      ucp_am_send_nbx(peer->ep, ucx::kHelloAm, &peer->hello, sizeof peer->hello,
                      worker_->address().data(), worker_->address().size(), &prm);
  if (UCS_PTR_IS_ERR(req)) {
    *error = absl::StrCat("cannot greet it over UCX: ", ucs_status_string(UCS_PTR_STATUS(req)));
    ucx::CloseEndpoint(peer->ep);
    peer->ep = nullptr;
    return nullptr;
  }
  return peer.get();
}

ucp_mem_h UcxExpertTransport::PackOrRegister(Pending& p, const Peer& peer) {
  ucp_mem_h memh = p.payload != nullptr ? worker_->Register(*p.payload) : nullptr;
  if (p.segments.empty() || peer.gathers) return memh;
  // Packed into one registered buffer: a copy, cheaper over TCP than losing zero-copy.
  size_t total = p.payload->size;
  for (const std::string& seg : p.segments) total += ucx::Aligned(seg.size());
  UcxBufferPtr all = buffers().Take(total);
  if (all == nullptr) return memh;  // gathered from an iov after all
  std::memcpy(all->data, p.payload->data, p.payload->size);
  size_t at = p.payload->size;
  for (const std::string& seg : p.segments) {
    std::memcpy(all->data + at, seg.data(), seg.size());
    std::memset(all->data + at + seg.size(), 0, ucx::Aligned(seg.size()) - seg.size());
    at += ucx::Aligned(seg.size());
  }
  p.payload = std::move(all);
  p.segments.clear();
  p.data = p.payload->data;
  p.size = total;
  return worker_->Register(*p.payload);
}

bool UcxExpertTransport::DescribeAsIov(Pending& p, const Peer& peer) {
  if (!p.segments.empty()) {
    // Gathered by UCX: the head from the registered buffer, then each batch's rows.
    p.iov.clear();
    p.iov.push_back({p.payload->data, p.payload->size});
    for (const std::string& seg : p.segments) {
      if (!seg.empty()) p.iov.push_back({const_cast<char*>(seg.data()), seg.size()});
      if (const size_t pad = ucx::Aligned(seg.size()) - seg.size(); pad > 0) {
        p.iov.push_back({kZeros, pad});
      }
    }
    return true;
  }
  if (peer.copy_large && p.memory_type == UCS_MEMORY_TYPE_HOST && p.size > kUcxInlineBytes) {
    // Over shared memory a large contiguous payload would go by a zero-copy read of the
    // sender's memory (cma), which in a request/reply flow between sleeping workers
    // left both processes idle half the time (1 MiB requests: 4-7 GB/s); described as
    // an iov it goes through UCX's pipelined copy via shared memory, which keeps both
    // busy (9-13 GB/s, this VM, UCX 1.13.1).
    p.iov.assign(1, {const_cast<void*>(p.data), p.size});
    return true;
  }
  return false;
}

void UcxExpertTransport::FailPeer(Peer* peer, ucp_ep_h ep, const absl::Status& status) {
  if (ep == nullptr || peer->ep != ep) return;  // that endpoint is gone already
  ucx::CloseEndpoint(peer->ep);
  peer->ep = nullptr;
  {
    // A restarted service has a new worker address: ask Info again.
    MutexLock lock(&addresses_mu_);
    auto it = addresses_.find(peer->endpoint);
    if (it != addresses_.end() && it->second.address == peer->address) addresses_.erase(it);
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
    Finish(id, absl::Status(ucx::CodeFromWire(code), std::string(data->data, data->size)), nullptr);
    return;
  }
  Finish(id, absl::OkStatus(), std::move(data));
}

int UcxExpertTransport::OnIdle() {
  if (pending_.empty()) return -1;
  const auto now = Clock::now();
  const auto next = std::min(EndExpired(now), AskProbes(now));
  if (next == Clock::time_point::max()) return -1;
  const auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(next - now).count() + 1;
  return static_cast<int>(std::min<int64_t>(ms, 1000));
}

ExpertTransport::Clock::time_point UcxExpertTransport::EndExpired(Clock::time_point now) {
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
           absl::DeadlineExceededError(
               absl::StrCat(it->second->endpoint, ": no reply by the deadline")),
           nullptr);
  }
  return next;
}

ExpertTransport::Clock::time_point UcxExpertTransport::AskProbes(Clock::time_point now) {
  // Ask the control plane about the services that calls have waited on for a while.
  auto next = Clock::time_point::max();
  for (auto& [endpoint, peer] : peers_) {
    if (peer->ep == nullptr || peer->pending.empty()) continue;
    const auto interval = peer->detects_failure ? kProbeAfterDetecting : kProbeAfter;
    auto oldest = Clock::time_point::max();
    for (uint64_t id : peer->pending) {
      if (auto it = pending_.find(id); it != pending_.end()) {
        oldest = std::min(oldest, it->second->started);
      }
    }
    const auto due = std::max(oldest, peer->last_probe) + interval;
    if (due <= now) {
      peer->last_probe = now;
      {
        MutexLock lock(&probe_mu_);
        probe_queue_.emplace_back(endpoint, peer->address);
      }
      probe_cv_.Signal();
      next = std::min(next, now + interval);
    } else {
      next = std::min(next, due);
    }
  }
  return next;
}

void UcxExpertTransport::ProbeLoop() {
  while (true) {
    std::pair<std::string, std::string> probe;
    {
      MutexLock lock(&probe_mu_);
      while (!probe_stop_ && probe_queue_.empty()) probe_cv_.Wait(&probe_mu_);
      if (probe_stop_) return;
      probe = std::move(probe_queue_.front());
      probe_queue_.pop_front();
    }
    ++probes_;
    const auto& [endpoint, address] = probe;
    v1::InfoResponse info;
    const absl::Status s =
        control_->Info(endpoint, v1::InfoRequest(), Clock::now() + kProbeTimeout, &info);
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
      worker_->mutex().AssertHeld();  // posted work
      auto it = peers_.find(endpoint);
      if (it == peers_.end() || it->second->address != address) return;
      FailPeer(it->second.get(), it->second->ep, failed);
    });
  }
}

}  // namespace moemesh
