#include "tools/placement_cli.h"

#include <grpcpp/grpcpp.h>

#include <cstdio>
#include <map>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "controller.grpc.pb.h"
#include "services/base/status_macros.h"
#include "services/rpc/wire.h"
#include "services/runtime/flags.h"

namespace moemesh {
namespace {

constexpr char kUsage[] =
    "moemesh placement show --controller H:P        the placement, services, routers, moves\n"
    "moemesh placement rebalance --controller H:P   plan and carry out a round now\n"
    "moemesh placement drain ENDPOINT --controller H:P\n"
    "                                               move every expert off one service\n"
    "  [--timeout-s S] [--tls-ca FILE] [--tls-cert FILE --tls-key FILE] [--token-file FILE]\n"
    "  --token-file: the controller's admin token (--admin-token-file there)\n";

void PrintState(const v1::ControllerState& s) {
  std::printf("epoch %llu; moves %lld, aborted %lld, %.1f MiB moved%s\n",
              static_cast<unsigned long long>(s.placement().epoch()),
              static_cast<long long>(s.moves()), static_cast<long long>(s.aborted_moves()),
              s.bytes_moved() / 1048576.0,
              s.moving().empty() ? "" : absl::StrCat("; moving: ", s.moving()).c_str());
  std::printf("\n%-28s %-14s %-9s %8s %12s %10s %9s %8s\n", "service", "id", "state", "experts",
              "load tok/s", "weights", "lease ms", "ejected");
  for (const v1::ServiceState& m : s.services()) {
    std::printf("%-28s %-14s %-9s %8lld %12.1f %9.1fM %9lld %8lld\n", m.endpoint().c_str(),
                m.service_id().c_str(), m.state().c_str(), static_cast<long long>(m.experts()),
                m.load(), m.weight_bytes() / 1048576.0, static_cast<long long>(m.lease_left_ms()),
                static_cast<long long>(m.ejected_by()));
  }
  std::printf("\n%-28s %12s %10s\n", "router", "acked epoch", "connected");
  for (const v1::RouterState& r : s.routers()) {
    std::printf("%-28s %12llu %10s\n", r.router_id().c_str(),
                static_cast<unsigned long long>(r.acked_epoch()), r.connected() ? "yes" : "no");
  }
  std::map<int64_t, std::vector<std::string>> layers;
  for (const v1::PlacementEntry& e : s.placement().entries()) {
    layers[e.layer()].push_back(absl::StrCat(e.expert(), ":", absl::StrJoin(e.replicas(), "+")));
  }
  std::printf("\nplacement (expert:replicas)\n");
  for (const auto& [layer, entries] : layers) {
    std::printf("layer %lld: %s\n", static_cast<long long>(layer),
                absl::StrJoin(entries, " ").c_str());
  }
}

absl::Status Run(const std::vector<std::string>& argv) {
  if (argv.empty()) return absl::InvalidArgumentError("missing show, rebalance or drain");
  const std::string what = argv[0];
  std::string endpoint;
  std::vector<std::string> flags(argv.begin() + 1, argv.end());
  if (what == "drain") {
    if (flags.empty() || flags[0].rfind("--", 0) == 0) {
      return absl::InvalidArgumentError("drain needs the service's ENDPOINT");
    }
    endpoint = flags[0];
    flags.erase(flags.begin());
  } else if (what != "show" && what != "rebalance") {
    return absl::InvalidArgumentError(absl::StrCat("unknown placement command '", what, "'"));
  }
  ASSIGN_OR_RETURN(CliArgs args,
                   CliArgs::Parse(flags, WithSecurityFlags({"controller", "timeout-s"}, true)));
  ASSIGN_OR_RETURN(std::shared_ptr<Security> security, SecurityFromFlags(args));
  ASSIGN_OR_RETURN(const std::string controller, args.Required("controller"));
  ASSIGN_OR_RETURN(const double timeout_s, args.Double("timeout-s", 300));
  auto stub = v1::PlacementController::NewStub(security->Dial(controller));
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() +
                   std::chrono::milliseconds(static_cast<int64_t>(timeout_s * 1000)));
  if (what == "show") {
    v1::ControllerState state;
    RETURN_IF_ERROR(FromGrpcStatus(stub->GetState(&ctx, v1::GetStateRequest(), &state)));
    PrintState(state);
  } else if (what == "rebalance") {
    v1::RebalanceResponse resp;
    RETURN_IF_ERROR(FromGrpcStatus(stub->Rebalance(&ctx, v1::RebalanceRequest(), &resp)));
    std::printf("epoch %llu: %lld replicas added, %lld removed%s\n",
                static_cast<unsigned long long>(resp.epoch()), static_cast<long long>(resp.added()),
                static_cast<long long>(resp.removed()),
                resp.note().empty() ? "" : absl::StrCat(" (", resp.note(), ")").c_str());
  } else {
    v1::DrainRequest req;
    req.set_endpoint(endpoint);
    v1::DrainResponse resp;
    RETURN_IF_ERROR(FromGrpcStatus(stub->Drain(&ctx, req, &resp)));
    std::printf("%s drained: no router sends it anything from epoch %llu\n", endpoint.c_str(),
                static_cast<unsigned long long>(resp.epoch()));
  }
  return absl::OkStatus();
}

}  // namespace

int PlacementCommand(const std::vector<std::string>& args) {
  if (HelpRequested(args)) {
    std::fputs(kUsage, stdout);
    std::fputs(kClientSecurityUsage, stdout);
    return 0;
  }
  const absl::Status s = Run(args);
  if (!s.ok()) {
    std::fprintf(stderr, "moemesh placement: %s\n%s", std::string(s.ToString()).c_str(), kUsage);
    return 1;
  }
  return 0;
}

}  // namespace moemesh
