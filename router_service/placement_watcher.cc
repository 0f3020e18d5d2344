#include "router_service/placement_watcher.h"

#include <grpcpp/grpcpp.h>

#include <algorithm>
#include <cstdio>
#include <random>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "services/base/status_macros.h"

namespace moemesh {
namespace {

std::string RandomRouterId() {
  std::random_device rd;
  return absl::StrFormat("router-%08x%08x", rd(), rd());
}

}  // namespace

absl::Status PlacementWatcherOptions::Validate() const {
  if (controller.empty()) return absl::InvalidArgumentError("controller is required");
  if (report_interval.count() <= 0) {
    return absl::InvalidArgumentError("report_interval must be positive");
  }
  return absl::OkStatus();
}

PlacementWatcher::PlacementWatcher(PlacementWatcherOptions options, MoeRouter* router)
    : options_(std::move(options)), router_(router) {}

absl::StatusOr<std::unique_ptr<PlacementWatcher>> PlacementWatcher::Start(
    PlacementWatcherOptions options, MoeRouter* router) {
  RETURN_IF_ERROR(options.Validate());
  if (options.router_id.empty()) options.router_id = RandomRouterId();
  auto w = std::unique_ptr<PlacementWatcher>(new PlacementWatcher(std::move(options), router));
  grpc::ChannelArguments args;
  // A restarted controller is found again quickly.
  args.SetInt(GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS, 100);
  args.SetInt(GRPC_ARG_MAX_RECONNECT_BACKOFF_MS, 500);
  args.SetMaxReceiveMessageSize(256 << 20);
  if (w->options_.security == nullptr) w->options_.security = Security::Insecure();
  w->stub_ =
      v1::PlacementController::NewStub(w->options_.security->Dial(w->options_.controller, args));
  w->watcher_ = std::thread([raw = w.get()] { raw->WatchLoop(); });
  w->reporter_ = std::thread([raw = w.get()] { raw->ReportLoop(); });
  return w;
}

PlacementWatcher::~PlacementWatcher() {
  {
    MutexLock lock(&mu_);
    stop_ = true;
    if (stream_ != nullptr) stream_->TryCancel();
  }
  watcher_.join();
  reporter_.join();
}

bool PlacementWatcher::SleepFor(std::chrono::milliseconds d) {
  MutexLock lock(&mu_);
  return !mu_.AwaitWithTimeout(&stop_, d);
}

void PlacementWatcher::WatchLoop() {
  auto backoff = std::chrono::milliseconds(100);
  while (true) {
    {
      MutexLock lock(&mu_);
      if (stop_) return;
    }
    const auto opened = std::chrono::steady_clock::now();
    WatchOnce();
    // A stream that lived a while resets the backoff: the controller was there.
    if (std::chrono::steady_clock::now() - opened > std::chrono::seconds(5)) {
      backoff = std::chrono::milliseconds(100);
    }
    if (!SleepFor(backoff)) return;
    // At most 500 ms: a restarted controller settles for 2 s (ControllerOptions::settle)
    // and must hear from every router before it plans.
    backoff = std::min<std::chrono::milliseconds>(backoff * 2, std::chrono::milliseconds(500));
  }
}

void PlacementWatcher::WatchOnce() {
  grpc::ClientContext ctx;
  {
    MutexLock lock(&mu_);
    if (stop_) return;
    stream_ = &ctx;
  }
  v1::WatchPlacementRequest req;
  req.set_router_id(options_.router_id);
  *req.mutable_serving() = router_->placement()->ToProto();
  std::unique_ptr<grpc::ClientReader<v1::Placement>> reader = stub_->WatchPlacement(&ctx, req);
  v1::Placement placement;
  while (reader->Read(&placement)) {
    connected_ = true;
    Apply(placement);
  }
  connected_ = false;
  const grpc::Status s = reader->Finish();
  {
    MutexLock lock(&mu_);
    stream_ = nullptr;
    if (stop_) return;
  }
  std::fprintf(stderr, "router %s: placement stream from %s ended (%s); serving epoch %llu\n",
               options_.router_id.c_str(), options_.controller.c_str(), s.error_message().c_str(),
               static_cast<unsigned long long>(router_->placement()->epoch()));
}

void PlacementWatcher::Apply(const v1::Placement& placement) {
  absl::StatusOr<PlacementTable> table = PlacementTable::FromProto(placement, router_->config());
  if (!table.ok()) {
    std::fprintf(stderr, "router %s: refused placement epoch %llu: %s\n",
                 options_.router_id.c_str(), static_cast<unsigned long long>(placement.epoch()),
                 table.status().ToString().c_str());
    return;
  }
  // A table naming a replica that does not hold what it is given is refused (and the
  // refusal goes back with the acknowledgement of the epoch still served).
  absl::Status refused;
  if (table->epoch() > router_->placement()->epoch()) {
    refused = router_->SetPlacement(*std::move(table));
    if (!refused.ok()) {
      std::fprintf(stderr, "router %s: refused placement epoch %llu: %s\n",
                   options_.router_id.c_str(), static_cast<unsigned long long>(placement.epoch()),
                   refused.ToString().c_str());
    }
  }
  // Acknowledged once no call planned on an older table is in flight; calls end by their
  // deadlines, which the router caps, so this wait is bounded.
  const uint64_t epoch = router_->placement()->epoch();
  const auto limit =
      MoeRouter::Clock::now() + router_->options().default_timeout + std::chrono::seconds(1);
  router_->WaitForOlderCalls(epoch, limit);
  v1::AckPlacementRequest ack;
  ack.set_router_id(options_.router_id);
  ack.set_epoch(epoch);
  if (!refused.ok()) {
    ack.set_refused_epoch(placement.epoch());
    ack.set_refusal(std::string(refused.message()));
  }
  for (int attempt = 0; attempt < 3; ++attempt) {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(2));
    v1::AckPlacementResponse resp;
    if (stub_->AckPlacement(&ctx, ack, &resp).ok()) return;
    // Still lost: the next watch request carries the epoch served.
  }
}

void PlacementWatcher::ReportLoop() {
  while (SleepFor(options_.report_interval)) {
    v1::LoadReport report;
    report.set_router_id(options_.router_id);
    router_->FillExpertLoad(-1, report.mutable_load());
    for (const std::string& endpoint : router_->Ejected()) report.add_ejected(endpoint);
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
    v1::ReportLoadResponse resp;
    stub_->ReportLoad(&ctx, report, &resp);  // the controller may be away: the next one counts
  }
}

}  // namespace moemesh
