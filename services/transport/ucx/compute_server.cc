#include "services/transport/ucx/compute_server.h"

#include <pthread.h>
#include <sys/random.h>
#include <ucp/api/ucp.h>

#include <algorithm>
#include <cstring>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "services/rpc/security.h"
#include "services/transport/ucx/ucp_helpers.h"

namespace moemesh {

struct UcxComputeServer::Client {
  UcxComputeServer* owner = nullptr;
  uint64_t id = 0;
  std::string address;
  ucp_ep_h ep = nullptr;
  bool copy_large = false;  // large replies go as an iov (see SendReply)
  bool accepted = false;    // a hello with a valid credential came
};

// UCX's callbacks. AM callbacks and completions of successful operations run in the
// worker's progress, holding its lock; failures may come from UCX's async thread, so
// they hand the work on to the worker thread (Post).
struct UcxComputeServer::Callbacks {
  // kHelloAm: a client introduces itself.
  static ucs_status_t HelloAm(void* arg, const void* header, size_t header_length, void* data,
                              size_t length, const ucp_am_recv_param_t* param) {
    auto* server = static_cast<UcxComputeServer*>(arg);
    const bool rndv = (param->recv_attr & UCP_AM_RECV_ATTR_FLAG_RNDV) != 0;
    ucx::HelloHeader h;
    if (rndv || header_length != sizeof h) return ucx::DropMessage();
    std::memcpy(&h, header, sizeof h);
    if (h.magic != ucx::kMagic) return ucx::DropMessage();
    if (!server->CheckCredential(h.credential)) {
      ++server->refused_hellos_;
      return ucx::DropMessage();  // never connected back to; its requests are dropped
    }
    server->worker_->mutex().AssertHeld();  // AM callbacks run in the worker's progress
    server->Accept(h.client);
    // Connected after this callback, before any reply: replies are posted later.
    server->worker_->Post(
        [server, client = h.client,
         address = std::string(static_cast<const char*>(data), length)]() mutable {
          server->worker_->mutex().AssertHeld();  // posted work
          server->Hello(client, std::move(address));
        });
    return UCS_OK;
  }

  // kRequestAm: a request. Checked, given a buffer, then copied in (eager) or fetched
  // into it (rendezvous) and queued.
  static ucs_status_t RequestAm(void* arg, const void* header, size_t header_length, void* data,
                                size_t length, const ucp_am_recv_param_t* param) {
    auto* server = static_cast<UcxComputeServer*>(arg);
    ucx::RequestHeader h;
    if (header_length != sizeof h) return ucx::DropMessage();
    std::memcpy(&h, header, sizeof h);
    if (h.magic != ucx::kMagic) return ucx::DropMessage();
    server->worker_->mutex().AssertHeld();  // AM callbacks run in the worker's progress
    if (!server->Accepted(h.client)) {
      // Dropped before any of it is copied or fetched (a rendezvous' data stays with the
      // sender).
      ++server->refused_requests_;
      return ucx::DropMessage();
    }
    ++server->in_flight_;
    server->Arrived();
    absl::StatusOr<UcxBufferPtr> buffer = server->TakeRequestBuffer(length);
    if (!buffer.ok()) {
      server->Refuse(h.client, h.id, buffer.status());
      return UCS_OK;
    }
    if ((param->recv_attr & UCP_AM_RECV_ATTR_FLAG_RNDV) == 0) {
      std::memcpy((*buffer)->data, data, length);
      server->Enqueue({h.client, h.id, h.format, *std::move(buffer)}, length <= kUcxInlineBytes);
      return UCS_OK;
    }
    UcxBuffer* raw = buffer->get();
    auto* r = new RequestRecv{server, h.client, h.id, h.format, *std::move(buffer)};
    ucx::ReceiveRendezvous(*server->worker_, data, raw, &RequestReceived, r);
    return UCS_INPROGRESS;
  }

  // A rendezvous request being received.
  struct RequestRecv {
    UcxComputeServer* owner;
    uint64_t client, id;
    uint32_t format;
    UcxBufferPtr buffer;
  };

  static void RequestReceived(void* request, ucs_status_t status, size_t, void* user_data) {
    ucx::FreeRequest(request);
    std::unique_ptr<RequestRecv> r(static_cast<RequestRecv*>(user_data));
    if (status != UCS_OK) {
      --r->owner->in_flight_;
      return;  // the client is gone; nothing to answer
    }
    const bool small = r->buffer->size <= kUcxInlineBytes;  // rendezvous over shared memory
    r->owner->Enqueue({r->client, r->id, r->format, std::move(r->buffer)}, small);
  }

  // The endpoint back to a client failed (the client is gone).
  static void ClientFailed(void* arg, ucp_ep_h ep, ucs_status_t) {
    auto* client = static_cast<Client*>(arg);
    if (client->owner->closing_.load()) return;  // endpoints going away with the worker
    client->owner->worker_->Post([client, ep] {
      client->owner->worker_->mutex().AssertHeld();  // posted work
      if (client->ep != ep) return;
      ucx::CloseEndpoint(ep);
      client->ep = nullptr;
      --client->owner->clients_count_;
    });
  }

  // A reply's header and payload, alive until its send completes.
  struct OutgoingReply {
    ucx::ReplyHeader header;
    UcxBufferPtr payload;
    ucp_dt_iov_t iov{};
  };
  static void ReplySent(void* request, ucs_status_t, void* user_data) {
    ucx::FreeRequest(request);
    delete static_cast<OutgoingReply*>(user_data);
  }
};

absl::StatusOr<std::unique_ptr<UcxComputeServer>> UcxComputeServer::Create(
    Compute compute, int threads, int max_message_bytes, std::chrono::microseconds spin) {
  auto s = std::unique_ptr<UcxComputeServer>(new UcxComputeServer());
  s->compute_ = std::move(compute);
  s->max_message_bytes_ = max_message_bytes;
  auto worker = UcxWorkerThread::Create("expert service");
  if (!worker.ok()) return worker.status();
  s->worker_ = *std::move(worker);
  for (auto [id, cb] : {std::pair{ucx::kRequestAm, &Callbacks::RequestAm},
                        std::pair{ucx::kHelloAm, &Callbacks::HelloAm}}) {
    if (absl::Status st = ucx::SetHandler(s->worker_->worker(), id, cb, s.get()); !st.ok()) {
      return st;
    }
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
    MutexLock lock(&mu_);
    stop_ = true;
  }
  cv_.SignalAll();
  for (auto& t : threads_) t.join();  // the queued requests are answered first
  closing_ = true;
  worker_->Post([this] {
    worker_->mutex().AssertHeld();  // posted work
    for (auto& [id, client] : clients_) {
      if (client->ep != nullptr) ucx::CloseEndpoint(client->ep);
      client->ep = nullptr;
    }
  });
  worker_->Stop();
  worker_.reset();
}

absl::StatusOr<UcxBufferPtr> UcxComputeServer::TakeRequestBuffer(size_t length) {
  if (length > static_cast<size_t>(max_message_bytes_)) {
    return absl::ResourceExhaustedError(
        absl::StrCat("request of ", length, " bytes is over the limit of ", max_message_bytes_));
  }
  UcxBufferPtr buffer = worker_->buffers().Take(length);
  if (buffer == nullptr) {
    return absl::ResourceExhaustedError(
        absl::StrCat("no memory for a request of ", length, " bytes"));
  }
  return buffer;
}

void UcxComputeServer::Refuse(uint64_t client, uint64_t id, const absl::Status& status) {
  UcxBufferPtr message = worker_->buffers().Take(status.message().size());
  if (message != nullptr) std::memcpy(message->data, status.message().data(), message->size);
  worker_->Post([this, client, id, code = static_cast<int32_t>(status.code()),
                 message = std::make_shared<UcxBufferPtr>(std::move(message))] {
    worker_->mutex().AssertHeld();  // posted work
    Reply(client, id, code, std::move(*message), true);
  });
}

void UcxComputeServer::Enqueue(Job job, bool may_inline) {
  {
    MutexLock lock(&mu_);
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
  cv_.Signal();
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
    MutexLock lock(&mu_);
    jobs.swap(inline_jobs_);
    has_inline_ = false;
  }
  for (Job& job : jobs) {
    ++computed_inline_;
    Send(Serve(std::move(job), inline_request_, inline_response_, inline_rows_));
  }
}

void UcxComputeServer::ComputeLoop() {
  v1::ComputeRequest request;
  v1::ComputeResponse response;
  RowSegments rows;
  while (true) {
    Job job;
    {
      MutexLock lock(&mu_);
      while (!stop_ && jobs_.empty()) cv_.Wait(&mu_);
      if (jobs_.empty()) return;
      job = std::move(jobs_.front());
      jobs_.pop_front();
      ++busy_;
    }
    Answer answer = Serve(std::move(job), request, response, rows);
    {
      // Idle before the reply goes: the next request, which may follow it at once,
      // finds this thread free.
      MutexLock lock(&mu_);
      --busy_;
      --working_;
    }
    Send(std::move(answer));
  }
}

UcxComputeServer::Answer UcxComputeServer::Serve(Job job, v1::ComputeRequest& request,
                                                 v1::ComputeResponse& response, RowSegments& rows) {
  request.Clear();
  response.Clear();
  rows.clear();
  absl::Status status = ucx::ParseRequest(
      job.format, absl::string_view(job.payload->data, job.payload->size), &request, &rows);
  if (status.ok()) status = compute_(request, rows, &response);
  job.payload.reset();  // back to the pool before the reply takes a buffer
  return Encode(job, status, response);
}

UcxComputeServer::Answer UcxComputeServer::Encode(const Job& job, const absl::Status& status,
                                                  const v1::ComputeResponse& response) {
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
  worker_->RunLocked([&] {
    worker_->mutex().AssertHeld();  // RunLocked
    Reply(answer.client, answer.id, answer.code, std::move(answer.payload));
  });
}

std::string UcxComputeServer::IssueCredential() {
  std::string credential(ucx::kCredentialBytes, '\0');
  size_t filled = 0;
  while (filled < credential.size()) {
    const ssize_t n = getrandom(credential.data() + filled, credential.size() - filled, 0);
    if (n > 0) filled += static_cast<size_t>(n);
  }
  std::string id = credential.substr(0, ucx::kCredentialIdBytes);
  MutexLock lock(&credentials_mu_);
  credentials_[id] = credential.substr(ucx::kCredentialIdBytes);
  credential_order_.push_back(std::move(id));
  if (credential_order_.size() > kMaxCredentials) {
    credentials_.erase(credential_order_.front());
    credential_order_.pop_front();
  }
  return credential;
}

bool UcxComputeServer::CheckCredential(const uint8_t* credential) {
  const std::string id(reinterpret_cast<const char*>(credential), ucx::kCredentialIdBytes);
  const absl::string_view secret(
      reinterpret_cast<const char*>(credential) + ucx::kCredentialIdBytes,
      ucx::kCredentialBytes - ucx::kCredentialIdBytes);
  MutexLock lock(&credentials_mu_);
  auto it = credentials_.find(id);
  return it != credentials_.end() && ConstantTimeEquals(it->second, secret);
}

void UcxComputeServer::Accept(uint64_t id) {
  std::unique_ptr<Client>& client = clients_[id];
  if (client == nullptr) {
    client = std::make_unique<Client>();
    client->owner = this;
    client->id = id;
  }
  client->accepted = true;
}

bool UcxComputeServer::Accepted(uint64_t id) const {
  auto it = clients_.find(id);
  return it != clients_.end() && it->second->accepted;
}

void UcxComputeServer::Hello(uint64_t id, std::string address) {
  auto it = clients_.find(id);
  if (it == clients_.end()) return;  // made by Accept, before this was posted
  std::unique_ptr<Client>& client = it->second;
  // A hello on a connection the client made anew: its way back is made anew too, even to
  // the same address (the old one may be broken without UCX having said so yet, e.g.
  // after the connection was reset: replies sent there would be lost).
  if (client->ep != nullptr) {
    ucx::CloseEndpoint(client->ep);
    client->ep = nullptr;
    --clients_count_;
  }
  bool detects_failure;
  if (ucx::CreateEndpoint(worker_->worker(), address, &Callbacks::ClientFailed, client.get(),
                          &client->ep, &detects_failure) != UCS_OK) {
    return;  // its requests are dropped; it sees deadlines pass
  }
  client->address = std::move(address);
  client->copy_large = ucx::InspectLanes(client->ep).shared_memory_only;
  ++clients_count_;
}

void UcxComputeServer::Reply(uint64_t client_id, uint64_t id, int32_t code, UcxBufferPtr payload,
                             bool deferred) {
  auto it = clients_.find(client_id);
  if (it == clients_.end() && !deferred) {
    // A new client's hello is handled by posted work (its endpoint back is made
    // outside the AM callback): the reply queues up behind it.
    worker_->Post(
        [this, client_id, id, code, out = std::make_shared<UcxBufferPtr>(std::move(payload))] {
          worker_->mutex().AssertHeld();  // posted work
          Reply(client_id, id, code, std::move(*out), true);
        });
    return;
  }
  --in_flight_;
  if (it == clients_.end() || it->second->ep == nullptr) {
    ++dropped_;  // no way back to it
    return;
  }
  SendReply(*it->second, id, code, std::move(payload));
}

void UcxComputeServer::SendReply(const Client& client, uint64_t id, int32_t code,
                                 UcxBufferPtr payload) {
  auto* out = new Callbacks::OutgoingReply{{ucx::kMagic, id, code, 0}, std::move(payload)};
  const void* data = out->payload != nullptr ? out->payload->data : nullptr;
  const size_t size = out->payload != nullptr ? out->payload->size : 0;
  ucp_request_param_t prm =
      ucx::SendParams(&Callbacks::ReplySent, out, 0,
                      out->payload != nullptr ? worker_->Register(*out->payload) : nullptr);
  size_t count = size;
  if (client.copy_large && size > kUcxInlineBytes) {
    // As a large request over shared memory (UcxExpertTransport::StartOnWorker): UCX's
    // pipelined copy.
    out->iov = {const_cast<void*>(data), size};
    ucx::AsIov(prm);
    data = &out->iov;
    count = 1;
  }
  const ucs_status_ptr_t req = ucp_am_send_nbx(client.ep, ucx::kReplyAm, &out->header,
                                               sizeof out->header, data, count, &prm);
  if (req == nullptr || UCS_PTR_IS_ERR(req)) {
    delete out;  // sent in place, or the client is gone
  } else if (!worker_->on_worker_thread()) {
    worker_->Wake();  // the rest goes on in its progress
  }
}

}  // namespace moemesh
