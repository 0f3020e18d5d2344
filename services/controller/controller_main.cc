#include "services/controller/controller_main.h"

#include <atomic>

#include "absl/strings/str_cat.h"
#include "services/base/status_macros.h"
#include "services/controller/controller.h"
#include "services/metrics/exposer.h"
#include "services/runtime/flags.h"
#include "services/runtime/service_main.h"

namespace moemesh {
namespace {

constexpr char kUsage[] =
    "moemesh controller --model DIR [--listen HOST:PORT] [--metrics-listen HOST:PORT]\n"
    "  [--rebalance-interval-s S] [--min-replicas R] [--expert-slots N] [--lease-s S]\n"
    "  [--settle-s S] [--min-gain F] [--load-timeout-s S] [--ack-timeout-s S]\n"
    "  [--ejected-failed-s S]\n"
    "  Owns the placement of one model: expert services register with it (moemesh expert\n"
    "  --controller), routers follow it (moemesh router --controller), and every\n"
    "  --rebalance-interval-s (default 10; 0: only on request) it moves and replicates\n"
    "  experts to even out the routers' measured load, make-before-break.\n"
    "  --min-replicas: ready replicas of every (layer, expert), on distinct services (default 1)\n"
    "  --expert-slots: most (layer, expert) pairs one service holds (default: all fit)\n"
    "  --lease-s: a service without a heartbeat for this long is dropped (default 3)\n"
    "  --settle-s: after a (re)start nothing is planned for max(lease, this) while services\n"
    "    re-register and routers report the placement they serve (default 2)\n"
    "  --min-gain: publish a layer's new placement only when its most loaded service's load\n"
    "    drops by this fraction (default 0.10; docs/planner.md)\n"
    "  --load-timeout-s, --ack-timeout-s: a service loading its new experts (default 120), every\n"
    "    router acknowledging a new epoch (default 45): past them the round is aborted\n"
    "  --ejected-failed-s: a service every router reporting load has ejected (outlier\n"
    "    ejection) for S seconds is treated as failed and its experts re-homed (default 0:\n"
    "    never)\n";

absl::Status Run(const std::vector<std::string>& argv) {
  ASSIGN_OR_RETURN(
      CliArgs args,
      CliArgs::Parse(argv, WithSecurityFlags(
                               {"model", "listen", "metrics-listen", "rebalance-interval-s",
                                "min-replicas", "expert-slots", "lease-s", "settle-s", "min-gain",
                                "load-timeout-s", "ack-timeout-s", "ejected-failed-s"})));
  ControllerOptions o;
  ASSIGN_OR_RETURN(o.model_dir, args.Required("model"));
  ASSIGN_OR_RETURN(o.security, SecurityFromFlags(args));
  o.listen = args.String("listen", o.listen);
  ASSIGN_OR_RETURN(o.rebalance_interval, args.Seconds("rebalance-interval-s", 10.0, 0, 86400));
  ASSIGN_OR_RETURN(const int64_t replicas, args.Int("min-replicas", 1));
  if (replicas < 1 || replicas > 64) {
    return absl::InvalidArgumentError("--min-replicas must be in [1, 64]");
  }
  o.min_replicas = static_cast<int>(replicas);
  ASSIGN_OR_RETURN(const int64_t slots, args.Int("expert-slots", 0));
  if (slots < 0 || slots > (int64_t{1} << 30)) {
    return absl::InvalidArgumentError("--expert-slots must be >= 0");
  }
  o.expert_slots = static_cast<int>(slots);
  ASSIGN_OR_RETURN(o.lease, args.Seconds("lease-s", 3.0, 0.3, 3600));
  ASSIGN_OR_RETURN(o.settle, args.Seconds("settle-s", 2.0, 0, 3600));
  ASSIGN_OR_RETURN(o.min_gain, args.Double("min-gain", o.min_gain));
  ASSIGN_OR_RETURN(o.load_timeout,
                   args.Seconds("load-timeout-s", o.load_timeout.count() / 1000.0, 0.1, 3600));
  ASSIGN_OR_RETURN(o.ack_timeout,
                   args.Seconds("ack-timeout-s", o.ack_timeout.count() / 1000.0, 0.1, 3600));
  ASSIGN_OR_RETURN(o.ejected_failed, args.Seconds("ejected-failed-s", 0, 0, 86400));
  metrics::Registry registry;
  const std::string metrics_listen = args.String("metrics-listen", "");
  if (!metrics_listen.empty()) {
    o.registry = &registry;
    RETURN_IF_ERROR(metrics::AddProcessMetrics(registry));
  }
  ASSIGN_OR_RETURN(std::unique_ptr<PlacementController> controller, PlacementController::Create(o));
  // /readyz: ready while it serves, not once a stop signal starts its shutdown (the gRPC
  // health's SERVING and NOT_SERVING).
  std::atomic<bool> serving{true};
  std::unique_ptr<metrics::MetricsExposer> exposer;
  if (!metrics_listen.empty()) {
    ASSIGN_OR_RETURN(exposer, metrics::ServeMetrics(metrics_listen, registry,
                                                    [&serving] { return serving.load(); }));
  }
  ServeUntilStopSignal("controller", o.listen, *controller, [&serving] { serving = false; });
  return absl::OkStatus();
}

}  // namespace

int ControllerMain(const std::vector<std::string>& args) {
  return RunServiceMain("controller", kUsage, args, Run, ProcessRole::kControlPlane);
}

}  // namespace moemesh
