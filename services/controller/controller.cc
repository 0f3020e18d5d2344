#include "services/controller/controller.h"

#include <google/protobuf/util/message_differencer.h>
#include <grpcpp/health_check_service_interface.h>

#include <algorithm>
#include <cstdio>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "services/base/status_macros.h"
#include "services/mesh/placement.h"
#include "services/model/checkpoint.h"
#include "services/rpc/grpc_server.h"
#include "services/rpc/wire.h"

namespace moemesh {
namespace {

using SteadyClock = std::chrono::steady_clock;
using ExpertKey = std::pair<int64_t, int32_t>;

const char* StateName(int state) {
  static const char* kNames[] = {"joining", "ready", "draining", "gone"};
  return kNames[state];
}

double Seconds(SteadyClock::duration d) { return std::chrono::duration<double>(d).count(); }

void Log(const std::string& line) { std::fprintf(stderr, "controller: %s\n", line.c_str()); }

v1::ExpertId Id(int64_t layer, int32_t expert) {
  v1::ExpertId id;
  id.set_layer(layer);
  id.set_expert(expert);
  return id;
}

}  // namespace

// The controller's metrics (docs/metrics.md).
struct PlacementController::Metrics {
  metrics::Counter* moves = nullptr;
  metrics::Counter* bytes_moved = nullptr;
  metrics::Family<metrics::Counter>* aborted = nullptr;
  metrics::Histogram* move_seconds = nullptr;
  metrics::Histogram* planning_seconds = nullptr;
};

absl::Status ControllerOptions::Validate() const {
  if (model_dir.empty()) return absl::InvalidArgumentError("model_dir is required");
  RETURN_IF_ERROR(ValidateGrpcServerOptions({listen, max_message_bytes}));
  if (rebalance_interval.count() < 0) {
    return absl::InvalidArgumentError("rebalance_interval must be >= 0");
  }
  if (min_replicas < 1) return absl::InvalidArgumentError("min_replicas must be >= 1");
  if (expert_slots < 0) return absl::InvalidArgumentError("expert_slots must be >= 0");
  if (lease.count() < 100) return absl::InvalidArgumentError("lease must be >= 100 ms");
  if (!(min_gain >= 0 && min_gain < 1)) return absl::InvalidArgumentError("min_gain in [0, 1)");
  if (load_timeout.count() <= 0 || ack_timeout.count() <= 0) {
    return absl::InvalidArgumentError("step timeouts must be positive");
  }
  return absl::OkStatus();
}

// --- gRPC service -----------------------------------------------------------------------

class PlacementController::Service final : public v1::PlacementController::Service {
 public:
  explicit Service(PlacementController* c) : c_(c) {}

  grpc::Status Register(grpc::ServerContext* ctx, const v1::RegisterRequest* req,
                        v1::RegisterResponse* resp) override {
    if (grpc::Status s = c_->options_.security->Authorize(*ctx, Access::kAdmin); !s.ok()) {
      return s;
    }
    if (req->endpoint().empty()) {
      return ToGrpcStatus(absl::InvalidArgumentError("register: endpoint is required"));
    }
    if (req->expert_bytes() < 0) {
      return ToGrpcStatus(absl::InvalidArgumentError("register: expert_bytes must be >= 0"));
    }
    for (const v1::ExpertId& id : req->experts()) {
      if (absl::Status s = c_->config_.CheckMoeLayer(id.layer()); !s.ok()) {
        return ToGrpcStatus(absl::InvalidArgumentError(absl::StrCat("register: ", s.message())));
      }
      if (id.expert() < 0 || id.expert() >= c_->config_.num_experts) {
        return ToGrpcStatus(absl::InvalidArgumentError(
            absl::StrCat("register: layer ", id.layer(), " expert ", id.expert(),
                         " out of range [0, ", c_->config_.num_experts, ")")));
      }
    }
    bool repair = false;
    {
      MutexLock lock(&c_->mu_);
      Member* m = c_->MemberLocked(req->endpoint());
      const bool fresh = m->state == Member::State::kGone || m->stub == nullptr;
      if (fresh) m->state = Member::State::kJoining;
      m->service_id = req->service_id();
      m->expert_bytes = req->expert_bytes();
      m->holds.clear();
      for (const v1::ExpertId& id : req->experts()) m->holds.insert({id.layer(), id.expert()});
      m->lease_until = SteadyClock::now() + c_->options_.lease;
      if (m->stub == nullptr) {
        grpc::ChannelArguments args;
        args.SetMaxReceiveMessageSize(c_->options_.max_message_bytes);
        m->stub = v1::ExpertService::NewStub(c_->options_.security->Dial(req->endpoint(), args));
      }
      resp->set_lease_ms(c_->options_.lease.count());
      resp->set_epoch(c_->placement_.epoch());
      repair = c_->NeedsRepairLocked();
      if (fresh) {
        Log(absl::StrCat("service ", req->endpoint(), " (", req->service_id(), ") joined holding ",
                         req->experts_size(), " experts"));
      }
    }
    // A new service gets work in the next round; at once when an expert lacks replicas.
    if (repair) c_->Trigger();
    return grpc::Status::OK;
  }

  grpc::Status Heartbeat(grpc::ServerContext* ctx, const v1::HeartbeatRequest* req,
                         v1::HeartbeatResponse* resp) override {
    if (grpc::Status s = c_->options_.security->Authorize(*ctx, Access::kAdmin); !s.ok()) {
      return s;
    }
    MutexLock lock(&c_->mu_);
    auto it = c_->members_.find(req->endpoint());
    if (it == c_->members_.end() || it->second.state == Member::State::kGone) {
      return ToGrpcStatus(absl::NotFoundError(
          absl::StrCat("service ", req->endpoint(), " is not registered: register again")));
    }
    it->second.lease_until = SteadyClock::now() + c_->options_.lease;
    resp->set_lease_ms(c_->options_.lease.count());
    return grpc::Status::OK;
  }

  grpc::Status Leave(grpc::ServerContext* ctx, const v1::LeaveRequest* req,
                     v1::LeaveResponse* resp) override {
    if (grpc::Status s = c_->options_.security->Authorize(*ctx, Access::kAdmin); !s.ok()) {
      return s;
    }
    absl::StatusOr<uint64_t> epoch = c_->DrainMember(req->endpoint(), ctx->deadline());
    if (epoch.ok()) resp->set_epoch(*epoch);
    return ToGrpcStatus(epoch.status());
  }

  grpc::Status Drain(grpc::ServerContext* ctx, const v1::DrainRequest* req,
                     v1::DrainResponse* resp) override {
    if (grpc::Status s = c_->options_.security->Authorize(*ctx, Access::kAdmin); !s.ok()) {
      return s;
    }
    absl::StatusOr<uint64_t> epoch = c_->DrainMember(req->endpoint(), ctx->deadline());
    if (epoch.ok()) resp->set_epoch(*epoch);
    return ToGrpcStatus(epoch.status());
  }

  grpc::Status WatchPlacement(grpc::ServerContext* ctx, const v1::WatchPlacementRequest* req,
                              grpc::ServerWriter<v1::Placement>* writer) override {
    if (grpc::Status s = c_->options_.security->Authorize(*ctx, Access::kAdmin); !s.ok()) {
      return s;
    }
    if (req->router_id().empty()) {
      return ToGrpcStatus(absl::InvalidArgumentError("watch: router_id is required"));
    }
    if (req->serving().epoch() > 0) {
      // What a restarted controller may adopt must be a placement of this model.
      if (absl::Status s = PlacementTable::FromProto(req->serving(), c_->config_).status();
          !s.ok()) {
        return ToGrpcStatus(absl::InvalidArgumentError(
            absl::StrCat("watch: the serving placement is not one of this model: ", s.message())));
      }
    }
    const std::string id = req->router_id();
    uint64_t sent = 0;
    c_->mu_.Lock();
    {
      Router& r = c_->routers_[id];
      ++r.streams;
      r.last_seen = SteadyClock::now();
      const uint64_t serving = req->serving().epoch();
      r.acked_epoch = serving;
      c_->epoch_floor_ = std::max(c_->epoch_floor_, serving);
      // A restarted controller takes the newest placement a router serves.
      if (!c_->settled_ && serving > c_->placement_.epoch() && req->serving().entries_size() > 0) {
        c_->placement_ = req->serving();
      }
      if (serving > 0 && serving >= c_->placement_.epoch() && c_->placement_.epoch() > 0 &&
          !google::protobuf::util::MessageDifferencer::Equals(req->serving(), c_->placement_)) {
        // A router that came back late serves a table this controller did not publish at
        // an epoch it has used (or passed): the placement in force is published again at a
        // newer epoch, which that router applies; rounds wait for its acknowledgement.
        c_->placement_.set_epoch(std::max(c_->placement_.epoch(), c_->epoch_floor_) + 1);
        c_->epoch_floor_ = c_->placement_.epoch();
        Log(absl::StrCat("router ", id, " serves another table at epoch ", serving,
                         ": the placement is published again as epoch ", c_->placement_.epoch()));
        c_->changed_.SignalAll();
      }
      if (serving == c_->placement_.epoch()) sent = serving;  // it has this one
    }
    while (!c_->stopping_ && !ctx->IsCancelled()) {
      if (c_->placement_.epoch() > 0 && c_->placement_.epoch() != sent) {
        const v1::Placement copy = c_->placement_;
        c_->mu_.Unlock();
        const bool ok = writer->Write(copy);
        c_->mu_.Lock();
        if (!ok) break;
        sent = copy.epoch();
        continue;
      }
      c_->changed_.WaitWithDeadline(&c_->mu_, SteadyClock::now() + std::chrono::milliseconds(200));
    }
    Router& r = c_->routers_[id];
    --r.streams;
    r.last_seen = SteadyClock::now();
    c_->mu_.Unlock();
    return grpc::Status::OK;
  }

  grpc::Status AckPlacement(grpc::ServerContext* ctx, const v1::AckPlacementRequest* req,
                            v1::AckPlacementResponse*) override {
    if (grpc::Status s = c_->options_.security->Authorize(*ctx, Access::kAdmin); !s.ok()) {
      return s;
    }
    MutexLock lock(&c_->mu_);
    auto it = c_->routers_.find(req->router_id());
    if (it == c_->routers_.end()) {
      return ToGrpcStatus(absl::NotFoundError(
          absl::StrCat("router ", req->router_id(), " does not watch the placement")));
    }
    if (req->epoch() > std::max(c_->placement_.epoch(), c_->epoch_floor_)) {
      return ToGrpcStatus(absl::FailedPreconditionError(
          absl::StrCat("epoch ", req->epoch(), " was never published (the newest is ",
                       c_->placement_.epoch(), ")")));
    }
    Router& r = it->second;
    r.acked_epoch = std::max(r.acked_epoch, req->epoch());
    if (req->refused_epoch() > r.refused_epoch) {
      r.refused_epoch = req->refused_epoch();
      r.refusal = req->refusal();
      Log(absl::StrCat("router ", req->router_id(), " refused epoch ", req->refused_epoch(), ": ",
                       req->refusal()));
    }
    r.last_seen = SteadyClock::now();
    c_->changed_.SignalAll();
    return grpc::Status::OK;
  }

  grpc::Status ReportLoad(grpc::ServerContext* ctx, const v1::LoadReport* req,
                          v1::ReportLoadResponse*) override {
    if (grpc::Status s = c_->options_.security->Authorize(*ctx, Access::kAdmin); !s.ok()) {
      return s;
    }
    for (const v1::LayerLoad& l : req->load().layers()) {
      if (absl::Status s = c_->config_.CheckMoeLayer(l.layer()); !s.ok()) {
        return ToGrpcStatus(absl::InvalidArgumentError(absl::StrCat("load report: ", s.message())));
      }
      if (l.window_rate_size() != c_->config_.num_experts) {
        return ToGrpcStatus(absl::InvalidArgumentError(
            absl::StrCat("load report: layer ", l.layer(), " has ", l.window_rate_size(),
                         " rates for ", c_->config_.num_experts, " experts")));
      }
    }
    MutexLock lock(&c_->mu_);
    Router& r = c_->routers_[req->router_id()];
    r.ejected = {req->ejected().begin(), req->ejected().end()};
    r.load = req->load();
    r.load_at = SteadyClock::now();
    r.last_seen = r.load_at;
    return grpc::Status::OK;
  }

  grpc::Status GetState(grpc::ServerContext* ctx, const v1::GetStateRequest*,
                        v1::ControllerState* resp) override {
    if (grpc::Status s = c_->options_.security->Authorize(*ctx, Access::kAdmin); !s.ok()) {
      return s;
    }
    MutexLock lock(&c_->mu_);
    *resp = c_->StateLocked();
    return grpc::Status::OK;
  }

  grpc::Status Rebalance(grpc::ServerContext* ctx, const v1::RebalanceRequest*,
                         v1::RebalanceResponse* resp) override {
    if (grpc::Status s = c_->options_.security->Authorize(*ctx, Access::kAdmin); !s.ok()) {
      return s;
    }
    absl::StatusOr<RoundResult> r = c_->RunRound(/*forced=*/true);
    if (!r.ok()) return ToGrpcStatus(r.status());
    resp->set_epoch(r->epoch);
    resp->set_added(r->added);
    resp->set_removed(r->removed);
    resp->set_note(r->note);
    return grpc::Status::OK;
  }

 private:
  PlacementController* const c_;
};

// --- set-up and shutdown ------------------------------------------------------------------

absl::StatusOr<std::unique_ptr<PlacementController>> PlacementController::Create(
    ControllerOptions options) {
  RETURN_IF_ERROR(options.Validate());
  auto c = std::unique_ptr<PlacementController>(new PlacementController());
  c->options_ = std::move(options);
  if (c->options_.security == nullptr) c->options_.security = Security::Insecure();
  ASSIGN_OR_RETURN(std::unique_ptr<Checkpoint> ckpt, Checkpoint::Open(c->options_.model_dir));
  ASSIGN_OR_RETURN(c->config_, ParseMoeModelConfig(ckpt->config()));
  c->layers_ = c->config_.MoeLayers();
  c->started_ = SteadyClock::now();
  if (c->options_.registry != nullptr) {
    RETURN_IF_ERROR(c->RegisterMetrics());
    RETURN_IF_ERROR(c->options_.security->ExportMetrics(*c->options_.registry));
  }
  c->service_ = std::make_unique<Service>(c.get());
  ASSIGN_OR_RETURN(
      StartedServer started,
      StartGrpcServer({c->options_.listen, c->options_.max_message_bytes, c->options_.security},
                      {c->service_.get()}));
  c->server_ = std::move(started.server);
  c->port_ = started.port;
  c->server_->GetHealthCheckService()->SetServingStatus(true);
  c->rounds_ = std::thread([raw = c.get()] { raw->RoundLoop(); });
  return c;
}

PlacementController::~PlacementController() {
  if (server_ == nullptr) return;
  Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(5));
  server_->Wait();
}

void PlacementController::Shutdown(std::chrono::system_clock::time_point deadline) {
  {
    MutexLock lock(&mu_);
    if (stopping_) return;
    stopping_ = true;
    changed_.SignalAll();
  }
  server_->GetHealthCheckService()->SetServingStatus(false);
  if (rounds_.joinable()) rounds_.join();
  server_->Shutdown(deadline);
}

void PlacementController::Wait() { server_->Wait(); }

PlacementController::Member* PlacementController::MemberLocked(const std::string& endpoint) {
  Member& m = members_[endpoint];
  m.endpoint = endpoint;
  return &m;
}

// --- rounds -----------------------------------------------------------------------------

void PlacementController::Trigger() {
  MutexLock lock(&mu_);
  triggered_ = true;
}

void PlacementController::RoundLoop() {
  auto next_round = SteadyClock::now() + options_.rebalance_interval;
  const auto tick =
      std::min<std::chrono::milliseconds>(options_.lease / 3, std::chrono::milliseconds(500));
  while (true) {
    bool due = false;
    {
      MutexLock lock(&mu_);
      mu_.AwaitWithDeadline(this, &PlacementController::Wakeup, SteadyClock::now() + tick);
      if (stopping_) return;
      ExpireLeasesLocked();
      ExpireEjectedLocked();
      if (!settled_ && SteadyClock::now() - started_ >= std::max(options_.lease, options_.settle)) {
        settled_ = true;
        Log(absl::StrCat("settled: ", members_.size(), " services, ", routers_.size(),
                         " routers, epoch ", placement_.epoch()));
        changed_.SignalAll();
        triggered_ = true;
      }
      if (!settled_) continue;
      const bool interval_due =
          options_.rebalance_interval.count() > 0 && SteadyClock::now() >= next_round;
      due = triggered_ || interval_due || NeedsRepairLocked();
      triggered_ = false;
    }
    if (due) {
      next_round = SteadyClock::now() + options_.rebalance_interval;
      absl::StatusOr<RoundResult> r = RunRound(/*forced=*/false);
      if (!r.ok()) Log(absl::StrCat("round failed: ", r.status().ToString()));
    }
    CollectGarbage();
  }
}

void PlacementController::ExpireLeasesLocked() {
  const auto now = SteadyClock::now();
  for (auto& [endpoint, m] : members_) {
    if (m.state == Member::State::kGone || m.lease_until > now) continue;
    m.state = Member::State::kGone;
    m.holds.clear();
    Log(absl::StrCat("service ", endpoint, " is gone (no heartbeat for ", options_.lease.count(),
                     " ms): its experts are re-homed"));
    triggered_ = true;
  }
}

std::pair<int, int> PlacementController::EjectionVotesLocked(const std::string& endpoint) const {
  const auto now = SteadyClock::now();
  int reporting = 0, ejecting = 0;
  for (const auto& [id, r] : routers_) {
    if (now - r.load_at > options_.lease) continue;  // no recent report: no vote
    ++reporting;
    if (r.ejected.count(endpoint)) ++ejecting;
  }
  return {reporting, ejecting};
}

void PlacementController::ExpireEjectedLocked() {
  const auto now = SteadyClock::now();
  for (auto& [endpoint, m] : members_) {
    if (m.state == Member::State::kGone) continue;
    const auto [reporting, ejecting] = EjectionVotesLocked(endpoint);
    if (reporting == 0 || ejecting < reporting) {
      m.ejected_since = {};
      continue;
    }
    if (m.ejected_since == SteadyClock::time_point{}) m.ejected_since = now;
    if (options_.ejected_failed.count() == 0 || now - m.ejected_since < options_.ejected_failed) {
      continue;
    }
    m.state = Member::State::kGone;
    m.holds.clear();
    m.ejected_since = {};
    Log(absl::StrCat("service ", endpoint, " ejected by every router for ",
                     options_.ejected_failed.count(),
                     " ms: treated as failed, its experts are re-homed"));
    triggered_ = true;
  }
}

bool PlacementController::NeedsRepairLocked() const {
  if (!settled_) return false;
  int alive = 0;
  for (const auto& [endpoint, m] : members_) {
    if (m.state != Member::State::kGone && m.state != Member::State::kDraining) ++alive;
  }
  if (alive == 0) return false;
  if (placement_.epoch() == 0) return true;
  const int want = std::min(options_.min_replicas, alive);
  for (const v1::PlacementEntry& e : placement_.entries()) {
    int ready = 0;
    for (const std::string& r : e.replicas()) {
      // A replica counts only while the service holds the expert: one restarted on the
      // same endpoint comes back empty.
      auto it = members_.find(r);
      if (it != members_.end() && it->second.state != Member::State::kGone &&
          it->second.state != Member::State::kDraining &&
          it->second.holds.count({e.layer(), e.expert()})) {
        ++ready;
      }
    }
    if (ready < want) return true;
  }
  return false;
}

absl::StatusOr<PlannerInput> PlacementController::PlannerInputLocked(
    std::vector<std::string>* order) {
  PlannerInput in;
  in.layers = layers_;
  in.num_experts = static_cast<int>(config_.num_experts);
  std::map<std::string, int> index;
  for (const auto& [endpoint, m] : members_) {
    if (m.state == Member::State::kGone) continue;
    index[endpoint] = static_cast<int>(order->size());
    order->push_back(endpoint);
    in.draining.push_back(m.state == Member::State::kDraining);
    in.expert_bytes = std::max(in.expert_bytes, m.expert_bytes);
  }
  in.num_services = static_cast<int>(order->size());
  for (int64_t layer : layers_) {
    in.current[layer].assign(config_.num_experts, {});
    in.load[layer].assign(config_.num_experts, 0.0);
  }
  if (placement_.epoch() > 0) {
    for (const v1::PlacementEntry& e : placement_.entries()) {
      auto layer = in.current.find(e.layer());
      if (layer == in.current.end() || e.expert() < 0 || e.expert() >= config_.num_experts)
        continue;
      for (const std::string& r : e.replicas()) {
        // Only where the expert is held (a service restarted on the same endpoint holds
        // nothing, though the placement still names it): the planner loads it again.
        auto it = index.find(r);
        if (it != index.end() && members_.at(r).holds.count({e.layer(), e.expert()})) {
          layer->second[e.expert()].push_back(it->second);
        }
      }
    }
  } else {
    // No placement yet (a fresh start): what the services hold is where the experts are.
    for (const auto& [endpoint, i] : index) {
      for (const ExpertKey& k : members_.at(endpoint).holds) {
        auto layer = in.current.find(k.first);
        if (layer != in.current.end() && k.second >= 0 && k.second < config_.num_experts) {
          layer->second[k.second].push_back(i);
        }
      }
    }
  }
  // The load: every router's latest windows, summed.
  for (const auto& [id, r] : routers_) {
    for (const v1::LayerLoad& l : r.load.layers()) {
      auto layer = in.load.find(l.layer());
      if (layer == in.load.end()) continue;
      for (int e = 0; e < l.window_rate_size() && e < config_.num_experts; ++e) {
        layer->second[e] += std::max(0.0, l.window_rate(e));
      }
    }
  }
  return in;
}

absl::Status PlacementController::LoadOnHolders(const std::vector<std::string>& order,
                                                const Plan& plan) {
  std::map<int, v1::LoadExpertsRequest> loads;
  for (const Change& c : plan.changes) {
    if (c.kind == Change::kAdd) *loads[c.service].add_experts() = Id(c.layer, c.expert);
  }
  for (const auto& [service, req] : loads) {
    const std::string& endpoint = order[service];
    v1::ExpertService::Stub* stub;
    {
      MutexLock lock(&mu_);
      auto it = members_.find(endpoint);
      if (it == members_.end() || it->second.stub == nullptr) {
        return absl::UnavailableError(absl::StrCat(endpoint, " is not registered"));
      }
      stub = it->second.stub.get();  // members are never erased: the stub stays
    }
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + options_.load_timeout);
    v1::LoadExpertsResponse resp;
    const grpc::Status s = stub->LoadExperts(&ctx, req, &resp);
    if (!s.ok()) {
      return absl::Status(FromGrpcStatus(s).code(),
                          absl::StrCat(endpoint, ": LoadExperts: ", s.error_message()));
    }
    // Confirmed by what the service says it holds, not by the call's success alone.
    grpc::ClientContext info_ctx;
    info_ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
    v1::InfoResponse info;
    const grpc::Status is = stub->Info(&info_ctx, v1::InfoRequest(), &info);
    if (!is.ok()) {
      return absl::UnavailableError(absl::StrCat(endpoint, ": Info: ", is.error_message()));
    }
    std::set<ExpertKey> held;
    for (const v1::ExpertId& id : info.experts()) held.insert({id.layer(), id.expert()});
    for (const v1::ExpertId& id : req.experts()) {
      if (!held.count({id.layer(), id.expert()})) {
        return absl::InternalError(absl::StrCat(endpoint, " does not hold layer ", id.layer(),
                                                " expert ", id.expert(), " after loading it"));
      }
    }
    MutexLock lock(&mu_);
    members_[endpoint].holds = std::move(held);
  }
  return absl::OkStatus();
}

void PlacementController::UnloadFromOldHolders(const std::vector<std::string>& order,
                                               const Plan& plan) {
  std::map<int, v1::UnloadExpertsRequest> unloads;
  for (const Change& c : plan.changes) {
    if (c.kind == Change::kRemove) *unloads[c.service].add_experts() = Id(c.layer, c.expert);
  }
  for (const auto& [service, req] : unloads) {
    const std::string& endpoint = order[service];
    v1::ExpertService::Stub* stub;
    {
      MutexLock lock(&mu_);
      auto it = members_.find(endpoint);
      if (it == members_.end() || it->second.state == Member::State::kGone) continue;
      stub = it->second.stub.get();
    }
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
    v1::UnloadExpertsResponse resp;
    const grpc::Status s = stub->UnloadExperts(&ctx, req, &resp);
    MutexLock lock(&mu_);
    if (!s.ok()) {
      Log(absl::StrCat(endpoint, ": UnloadExperts: ", s.error_message(), " (retried later)"));
      continue;
    }
    Member& m = members_[endpoint];
    for (const v1::ExpertId& id : req.experts()) m.holds.erase({id.layer(), id.expert()});
  }
}

uint64_t PlacementController::PublishLocked(
    const std::vector<std::string>& order,
    const std::map<int64_t, std::vector<std::vector<int>>>& placement) {
  v1::Placement p;
  p.set_epoch(std::max(placement_.epoch(), epoch_floor_) + 1);
  for (const auto& [layer, experts] : placement) {
    for (size_t e = 0; e < experts.size(); ++e) {
      v1::PlacementEntry* entry = p.add_entries();
      entry->set_layer(layer);
      entry->set_expert(static_cast<int32_t>(e));
      for (int s : experts[e]) entry->add_replicas(order[s]);
    }
  }
  placement_ = std::move(p);
  epoch_floor_ = placement_.epoch();
  changed_.SignalAll();
  return placement_.epoch();
}

bool PlacementController::AllAcked() const {
  const auto now = SteadyClock::now();
  for (const auto& [id, r] : routers_) {
    // A router gone for a lease no longer counts (its watch closed and it did not return).
    if (r.streams == 0 && now - r.last_seen > options_.lease) continue;
    if (r.acked_epoch < placement_.epoch()) return false;
  }
  return true;
}

void PlacementController::PromoteJoinersLocked() {
  if (placement_.epoch() == 0 || !AllAcked()) return;
  std::map<std::string, std::set<ExpertKey>> assigned;
  for (const v1::PlacementEntry& e : placement_.entries()) {
    for (const std::string& r : e.replicas()) assigned[r].insert({e.layer(), e.expert()});
  }
  for (auto& [endpoint, m] : members_) {
    if (m.state != Member::State::kJoining) continue;
    const std::set<ExpertKey>& want = assigned[endpoint];
    if (std::includes(m.holds.begin(), m.holds.end(), want.begin(), want.end())) {
      m.state = Member::State::kReady;
    }
  }
}

absl::Status PlacementController::WaitAcked(uint64_t epoch, SteadyClock::time_point deadline) {
  MutexLock lock(&mu_);
  while (true) {
    if (placement_.epoch() != epoch) {  // superseded (not while rounds serialise)
      return absl::AbortedError(absl::StrCat("epoch ", epoch, " was superseded"));
    }
    if (AllAcked()) return absl::OkStatus();
    for (const auto& [id, r] : routers_) {
      if (r.refused_epoch == epoch) {
        return absl::AbortedError(
            absl::StrCat("router ", id, " refused epoch ", epoch, ": ", r.refusal));
      }
    }
    if (stopping_) return absl::AbortedError("the controller is stopping");
    if (SteadyClock::now() >= deadline) {
      return absl::DeadlineExceededError(absl::StrCat("not every router acknowledged epoch ", epoch,
                                                      " within ", options_.ack_timeout.count(),
                                                      " ms; the old holders keep their copies"));
    }
    changed_.WaitWithDeadline(
        &mu_, std::min(deadline, SteadyClock::now() + std::chrono::milliseconds(200)));
  }
}

absl::StatusOr<PlacementController::RoundResult> PlacementController::RunRound(bool forced) {
  MutexLock round(&round_mu_);
  std::vector<std::string> order;
  PlannerInput input;
  RoundResult result;
  {
    MutexLock lock(&mu_);
    if (!settled_) {
      result.note = "settling: services and routers are reporting in after a (re)start";
      result.epoch = placement_.epoch();
      return result;
    }
    ASSIGN_OR_RETURN(input, PlannerInputLocked(&order));
    result.epoch = placement_.epoch();
  }
  if (input.num_services == 0) {
    result.note = "no expert service registered";
    return result;
  }
  PlannerOptions po;
  po.min_replicas = options_.min_replicas;
  po.expert_slots = options_.expert_slots;
  po.min_gain = options_.min_gain;
  const auto plan_start = SteadyClock::now();
  absl::StatusOr<Plan> plan = PlanPlacement(input, po);
  if (metrics_ != nullptr)
    metrics_->planning_seconds->Observe(Seconds(SteadyClock::now() - plan_start));
  if (!plan.ok()) return plan.status();
  {
    MutexLock lock(&mu_);
    last_layers_ = plan->layers;
  }
  if (!plan->worth_publishing) {
    result.note = forced ? "balanced within the hysteresis: no change worth its moves" : "balanced";
    MutexLock lock(&mu_);
    PromoteJoinersLocked();
    return result;
  }
  for (const Change& c : plan->changes) (c.kind == Change::kAdd ? result.added : result.removed)++;
  const auto start = SteadyClock::now();
  {
    MutexLock lock(&mu_);
    moving_ = absl::StrCat("epoch ", placement_.epoch(), " -> next: ", result.added,
                           " replicas added, ", result.removed, " removed");
  }
  Log(absl::StrCat("round: ", result.added, " replicas to add, ", result.removed, " to remove, ",
                   plan->bytes_moved, " bytes to copy"));
  auto abort = [&](const std::string& step, const absl::Status& why) {
    MutexLock lock(&mu_);
    ++aborted_;
    moving_.clear();
    if (metrics_ != nullptr) metrics_->aborted->Add({{"step", step}}).Increment();
    Log(absl::StrCat("round aborted at ", step, ": ", why.ToString()));
  };
  // 1. The new holders load their experts and confirm they hold them.
  if (absl::Status s = LoadOnHolders(order, *plan); !s.ok()) {
    abort("load", s);
    return absl::AbortedError(absl::StrCat("the round was aborted: ", s.message()));
  }
  // 2. The new epoch goes to every router.
  uint64_t epoch;
  {
    MutexLock lock(&mu_);
    epoch = PublishLocked(order, plan->placement);
  }
  result.epoch = epoch;
  // 3. Every router serves it, its calls on older epochs done.
  if (absl::Status s = WaitAcked(epoch, SteadyClock::now() + options_.ack_timeout); !s.ok()) {
    abort("ack", s);
    result.note = "published; the old holders unload once every router has acknowledged";
    return result;
  }
  // 4. The old holders unload.
  UnloadFromOldHolders(order, *plan);
  MutexLock lock(&mu_);
  moves_ += result.added;
  bytes_moved_ += plan->bytes_moved;
  moving_.clear();
  PromoteJoinersLocked();
  if (metrics_ != nullptr) {
    metrics_->moves->Increment(static_cast<double>(result.added));
    metrics_->bytes_moved->Increment(static_cast<double>(plan->bytes_moved));
    metrics_->move_seconds->Observe(Seconds(SteadyClock::now() - start));
  }
  changed_.SignalAll();
  Log(absl::StrCat("epoch ", epoch, " in force, acknowledged by every router"));
  return result;
}

void PlacementController::CollectGarbage() {
  std::map<std::string, v1::UnloadExpertsRequest> unloads;
  {
    MutexLock lock(&mu_);
    if (!settled_ || placement_.epoch() == 0 || !moving_.empty() || !AllAcked()) return;
    std::map<std::string, std::set<ExpertKey>> named;
    for (const v1::PlacementEntry& e : placement_.entries()) {
      for (const std::string& r : e.replicas()) named[r].insert({e.layer(), e.expert()});
    }
    for (const auto& [endpoint, m] : members_) {
      if (m.state == Member::State::kGone) continue;
      for (const ExpertKey& k : m.holds) {
        if (!named[endpoint].count(k)) *unloads[endpoint].add_experts() = Id(k.first, k.second);
      }
    }
  }
  if (unloads.empty()) return;
  MutexLock round(&round_mu_);
  for (const auto& [endpoint, req] : unloads) {
    v1::ExpertService::Stub* stub;
    {
      MutexLock lock(&mu_);
      stub = members_[endpoint].stub.get();
    }
    if (stub == nullptr) continue;
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
    v1::UnloadExpertsResponse resp;
    if (!stub->UnloadExperts(&ctx, req, &resp).ok()) continue;
    MutexLock lock(&mu_);
    Member& m = members_[endpoint];
    for (const v1::ExpertId& id : req.experts()) m.holds.erase({id.layer(), id.expert()});
  }
}

absl::StatusOr<uint64_t> PlacementController::DrainMember(
    const std::string& endpoint, std::chrono::system_clock::time_point deadline) {
  deadline = std::min(deadline, std::chrono::system_clock::now() + std::chrono::minutes(10));
  {
    MutexLock lock(&mu_);
    auto it = members_.find(endpoint);
    if (it == members_.end() || it->second.state == Member::State::kGone) {
      return absl::NotFoundError(absl::StrCat("no service ", endpoint, " is registered"));
    }
    it->second.state = Member::State::kDraining;
    triggered_ = true;
    Log(absl::StrCat("draining ", endpoint));
  }
  MutexLock lock(&mu_);
  while (true) {
    bool named = false;
    for (const v1::PlacementEntry& e : placement_.entries()) {
      for (const std::string& r : e.replicas()) named |= r == endpoint;
    }
    if (!named && AllAcked()) return placement_.epoch();
    if (stopping_) return absl::UnavailableError("the controller is stopping");
    bool other = false;
    for (const auto& [e, m] : members_) {
      other |=
          e != endpoint && (m.state == Member::State::kReady || m.state == Member::State::kJoining);
    }
    if (named && !other) {
      return absl::FailedPreconditionError(
          absl::StrCat(endpoint, " holds experts and no other service can take them"));
    }
    if (std::chrono::system_clock::now() >= deadline) {
      return absl::DeadlineExceededError(absl::StrCat(
          endpoint, " still holds experts no other service took (is there another service?)"));
    }
    changed_.WaitWithDeadline(&mu_, SteadyClock::now() + std::chrono::milliseconds(200));
  }
}

v1::ControllerState PlacementController::StateLocked() const {
  v1::ControllerState s;
  *s.mutable_placement() = placement_;
  std::map<std::string, int64_t> experts;
  for (const v1::PlacementEntry& e : placement_.entries()) {
    for (const std::string& r : e.replicas()) ++experts[r];
  }
  // Each service's share of the load: an expert's rate split evenly over its replicas.
  std::map<std::string, double> load;
  for (const v1::PlacementEntry& e : placement_.entries()) {
    double rate = 0;
    for (const auto& [id, r] : routers_) {
      for (const v1::LayerLoad& l : r.load.layers()) {
        if (l.layer() == e.layer() && e.expert() < l.window_rate_size()) {
          rate += l.window_rate(e.expert());
        }
      }
    }
    for (const std::string& r : e.replicas()) load[r] += rate / std::max(1, e.replicas_size());
  }
  const auto now = SteadyClock::now();
  for (const auto& [endpoint, m] : members_) {
    v1::ServiceState* st = s.add_services();
    st->set_endpoint(endpoint);
    st->set_service_id(m.service_id);
    st->set_state(StateName(static_cast<int>(m.state)));
    st->set_experts(experts[endpoint]);
    st->set_load(load[endpoint]);
    st->set_weight_bytes(experts[endpoint] * m.expert_bytes);
    st->set_lease_left_ms(std::max<int64_t>(
        0, std::chrono::duration_cast<std::chrono::milliseconds>(m.lease_until - now).count()));
    st->set_ejected_by(EjectionVotesLocked(endpoint).second);
    if (m.ejected_since != SteadyClock::time_point{}) {
      st->set_ejected_all_ms(
          std::chrono::duration_cast<std::chrono::milliseconds>(now - m.ejected_since).count());
    }
  }
  for (const auto& [id, r] : routers_) {
    v1::RouterState* rs = s.add_routers();
    rs->set_router_id(id);
    rs->set_acked_epoch(r.acked_epoch);
    rs->set_connected(r.streams > 0);
  }
  s.set_moves(moves_);
  s.set_aborted_moves(aborted_);
  s.set_bytes_moved(bytes_moved_);
  s.set_moving(moving_);
  return s;
}

// --- metrics ------------------------------------------------------------------------------

absl::Status PlacementController::RegisterMetrics() {
  metrics::Registry& registry = *options_.registry;
  auto m = std::make_unique<Metrics>();
  ASSIGN_OR_RETURN(auto* moves, metrics::AddCounter(registry, "moemesh_controller_moves_total",
                                                    "Expert replicas copied to a new holder."));
  m->moves = &moves->Add();
  ASSIGN_OR_RETURN(auto* bytes,
                   metrics::AddCounter(registry, "moemesh_controller_bytes_moved_total",
                                       "Expert weight bytes copied to new holders."));
  m->bytes_moved = &bytes->Add();
  ASSIGN_OR_RETURN(m->aborted,
                   metrics::AddCounter(registry, "moemesh_controller_aborted_moves_total",
                                       "Rounds aborted, by the step that failed or timed out."));
  for (const char* step : {"load", "ack"}) m->aborted->Add({{"step", step}});
  ASSIGN_OR_RETURN(auto* move_s,
                   metrics::AddHistogram(registry, "moemesh_controller_move_seconds",
                                         "One round's moves, first load to last unload.",
                                         {0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300}));
  m->move_seconds = &move_s->Add();
  ASSIGN_OR_RETURN(auto* plan_s,
                   metrics::AddHistogram(
                       registry, "moemesh_controller_planning_seconds", "One run of the planner.",
                       {0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5}));
  m->planning_seconds = &plan_s->Add();
  RETURN_IF_ERROR(metrics::AddComputedGauge(
      registry, "moemesh_controller_epoch", "Epoch of the placement in force.",
      [this](std::vector<metrics::Sample>* out) {
        MutexLock lock(&mu_);
        out->push_back({"", {}, static_cast<double>(placement_.epoch())});
      }));
  RETURN_IF_ERROR(metrics::AddComputedGauge(
      registry, "moemesh_controller_services", "Expert services registered, by state.",
      [this](std::vector<metrics::Sample>* out) {
        MutexLock lock(&mu_);
        std::map<std::string, int> count = {
            {"joining", 0}, {"ready", 0}, {"draining", 0}, {"gone", 0}};
        for (const auto& [e, m] : members_) ++count[StateName(static_cast<int>(m.state))];
        for (const auto& [state, n] : count) out->push_back({"", {{"state", state}}, double(n)});
      }));
  RETURN_IF_ERROR(metrics::AddComputedGauge(registry, "moemesh_controller_routers",
                                            "Routers whose placement stream is open.",
                                            [this](std::vector<metrics::Sample>* out) {
                                              MutexLock lock(&mu_);
                                              int n = 0;
                                              for (const auto& [id, r] : routers_)
                                                n += r.streams > 0;
                                              out->push_back({"", {}, static_cast<double>(n)});
                                            }));
  RETURN_IF_ERROR(metrics::AddComputedGauge(
      registry, "moemesh_controller_router_acked_epoch",
      "The last epoch each connected router acknowledged.",
      [this](std::vector<metrics::Sample>* out) {
        MutexLock lock(&mu_);
        for (const auto& [id, r] : routers_) {
          if (r.streams > 0) {
            out->push_back({"", {{"router", id}}, static_cast<double>(r.acked_epoch)});
          }
        }
      }));
  RETURN_IF_ERROR(metrics::AddComputedGauge(
      registry, "moemesh_controller_move_in_progress_seconds",
      "How long the round in progress has been moving experts (0: none).",
      [this, since = std::make_shared<std::pair<std::string, SteadyClock::time_point>>()](
          std::vector<metrics::Sample>* out) {
        MutexLock lock(&mu_);
        if (moving_.empty()) {
          since->first.clear();
          out->push_back({"", {}, 0.0});
          return;
        }
        if (since->first != moving_) *since = {moving_, SteadyClock::now()};
        out->push_back({"", {}, Seconds(SteadyClock::now() - since->second)});
      }));
  RETURN_IF_ERROR(metrics::AddComputedGauge(
      registry, "moemesh_controller_experts_below_target",
      "(layer, expert) pairs with fewer ready replicas than --min-replicas (capped at the "
      "services there are).",
      [this](std::vector<metrics::Sample>* out) {
        MutexLock lock(&mu_);
        int alive = 0;
        for (const auto& [e, m] : members_) {
          alive += m.state == Member::State::kReady || m.state == Member::State::kJoining;
        }
        const int want = std::min(options_.min_replicas, std::max(alive, 1));
        int64_t below = 0;
        if (placement_.epoch() == 0) {
          below = static_cast<int64_t>(layers_.size()) * config_.num_experts;
        }
        for (const v1::PlacementEntry& e : placement_.entries()) {
          int ready = 0;
          for (const std::string& r : e.replicas()) {
            auto it = members_.find(r);
            ready += it != members_.end() && (it->second.state == Member::State::kReady ||
                                              it->second.state == Member::State::kJoining);
          }
          below += ready < want;
        }
        out->push_back({"", {}, static_cast<double>(below)});
      }));
  RETURN_IF_ERROR(metrics::AddComputedGauge(
      registry, "moemesh_controller_layer_balance",
      "Per MoE layer, the last plan's mean over max of the tokens per service "
      "(1 = balanced), before and after it.",
      [this](std::vector<metrics::Sample>* out) {
        MutexLock lock(&mu_);
        for (const auto& [layer, l] : last_layers_) {
          const std::string label = absl::StrCat(layer);
          out->push_back({"",
                          {{"layer", label}, {"when", "before"}},
                          l.max_before > 0 ? l.mean / l.max_before : 1.0});
          out->push_back({"",
                          {{"layer", label}, {"when", "after"}},
                          l.max_after > 0 ? l.mean / l.max_after : 1.0});
        }
      }));
  metrics_ = std::move(m);
  return absl::OkStatus();
}

}  // namespace moemesh
