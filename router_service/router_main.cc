#include "router_service/router_main.h"

#include <cstdio>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "router_service/placement_watcher.h"
#include "router_service/router_server.h"
#include "services/base/status_macros.h"
#include "services/metrics/exposer.h"
#include "services/runtime/flags.h"
#include "services/runtime/service_main.h"
#include "services/transport/grpc_transport.h"
#include "services/transport/ucx/client.h"
#include "services/transport/ucx/protocol.h"

namespace moemesh {

const char kRouterUsage[] =
    "moemesh router --model DIR (--controller H:P | --endpoints H:P,H:P,... | --placement-file F)\n"
    "  [--listen HOST:PORT] [--placement contiguous|round-robin] [--replicas N]\n"
    "  [--wire f32|bf16] [--model-name NAME] [--max-message-mb N] [--timeout-ms MS]\n"
    "  [--capacity-factor F] [--metrics-listen HOST:PORT] [--expert-metrics auto|all|sum|L,L]\n"
    "  [--load-window-s S] [--transport grpc|ucx] [--ucx-spin-us US] [--device cpu|cuda]\n"
    "  [--gpu N] [--router-id ID] [--load-report-s S] [--max-inflight-tokens N]\n"
    "  [--eject-after N] [--eject-base-ms MS] [--eject-max-ms MS] [--eject-max-share F]\n"
    "  [--hedge-after-ms MS] [--hedge-budget F]\n"
    "  --controller: follow the placement controller at H:P (every new placement, acknowledged;\n"
    "    the load windows reported every --load-report-s, default 2); no --endpoints needed\n"
    "  --router-id: this router's name to the controller (default: random)\n"
    "  --metrics-listen: serve Prometheus metrics at http://HOST:PORT/metrics (port 0: any)\n"
    "  --expert-metrics: which per-expert series to export (docs/metrics.md; default auto)\n"
    "  --load-window-s: window of the load statistics and imbalance gauges (default 60)\n"
    "  --transport ucx: token data over UCX active messages (the services must run with\n"
    "    --transport ucx; UCX_TLS, UCX_NET_DEVICES etc. from the environment); gRPC stays the\n"
    "    control plane\n"
    "  --ucx-spin-us: how long a call waiting for its UCX replies polls before it sleeps\n"
    "    (default 1000; 0: never, every reply then wakes the waiting thread)\n"
    "  --device cuda: route (router logits and top-k) on GPU N (--gpu, default 0); the shared\n"
    "    experts and the combine stay on the CPU (default cpu)\n"
    "  --max-inflight-tokens: refuse a ModelInfer at once (RESOURCE_EXHAUSTED) when the tokens\n"
    "    in flight would pass N (default 0: no bound); calls queued past what their deadline\n"
    "    allows are refused DEADLINE_EXCEEDED\n"
    "  --eject-after: eject an expert service after N failures or timeouts in a row (default 5;\n"
    "    0: never) for --eject-base-ms (default 1000), doubling per ejection in a row up to\n"
    "    --eject-max-ms (default 30000); at most --eject-max-share of the services at once\n"
    "    (default 0.5)\n"
    "  --hedge-after-ms: send a call unanswered after MS again to other replicas of its experts,\n"
    "    first answer wins (default 0: off), at most --hedge-budget of the calls (default 0.1)\n";

namespace {

absl::Status Run(const std::vector<std::string>& argv) {
  ASSIGN_OR_RETURN(CliArgs args, CliArgs::Parse(argv, WithSecurityFlags({"model",
                                                                         "endpoints",
                                                                         "placement-file",
                                                                         "listen",
                                                                         "placement",
                                                                         "replicas",
                                                                         "wire",
                                                                         "model-name",
                                                                         "max-message-mb",
                                                                         "timeout-ms",
                                                                         "capacity-factor",
                                                                         "metrics-listen",
                                                                         "expert-metrics",
                                                                         "load-window-s",
                                                                         "transport",
                                                                         "ucx-spin-us",
                                                                         "device",
                                                                         "gpu",
                                                                         "controller",
                                                                         "router-id",
                                                                         "load-report-s",
                                                                         "max-inflight-tokens",
                                                                         "eject-after",
                                                                         "eject-base-ms",
                                                                         "eject-max-ms",
                                                                         "eject-max-share",
                                                                         "hedge-after-ms",
                                                                         "hedge-budget"})));
  ASSIGN_OR_RETURN(std::shared_ptr<Security> security, SecurityFromFlags(args));
  RouterOptions ro;
  ASSIGN_OR_RETURN(ro.model_dir, args.Required("model"));
  for (absl::string_view e : absl::StrSplit(args.String("endpoints", ""), ',', absl::SkipEmpty())) {
    ro.endpoints.emplace_back(e);
  }
  ro.placement_file = args.String("placement-file", "");
  const std::string controller = args.String("controller", "");
  ro.placement_from_controller = !controller.empty();
  if (!controller.empty() && (!ro.endpoints.empty() || !ro.placement_file.empty())) {
    return absl::InvalidArgumentError(
        "--controller gives the placement: no --endpoints or --placement-file with it");
  }
  ASSIGN_OR_RETURN(const std::chrono::milliseconds report_interval,
                   args.Seconds("load-report-s", 2.0, 0.1, 3600));
  ASSIGN_OR_RETURN(ro.policy, ParsePlacementPolicy(args.String("placement", "contiguous")));
  ASSIGN_OR_RETURN(int64_t replicas, args.Int("replicas", 1));
  ro.replicas = static_cast<int>(std::clamp<int64_t>(replicas, -1, 1 << 20));
  const std::string wire = absl::AsciiStrToLower(args.String("wire", "f32"));
  if (wire == "f32") {
    ro.wire_dtype = DType::kF32;
  } else if (wire == "bf16") {
    ro.wire_dtype = DType::kBF16;
  } else {
    return absl::InvalidArgumentError("--wire must be f32 or bf16");
  }
  ASSIGN_OR_RETURN(int64_t timeout_ms, args.Int("timeout-ms", 30000));
  ro.default_timeout = std::chrono::milliseconds(timeout_ms);
  ASSIGN_OR_RETURN(ro.gate.capacity_factor, args.Double("capacity-factor", 0.0));
  ASSIGN_OR_RETURN(std::vector<int> gpus, ParseDeviceFlags(args));
  if (gpus.size() > 1)
    return absl::InvalidArgumentError("--gpu: the router's gating runs on one GPU");
  ro.gate.gpu = gpus.empty() ? -1 : gpus[0];
  ASSIGN_OR_RETURN(ro.load_window, args.Seconds("load-window-s", 60.0, 1, 86400));
  ResilienceOptions& res = ro.resilience;
  ASSIGN_OR_RETURN(const int64_t eject_after, args.Int("eject-after", res.eject_after));
  if (eject_after < 0 || eject_after > 1000000) {
    return absl::InvalidArgumentError("--eject-after must be in [0, 1000000]");
  }
  res.eject_after = static_cast<int>(eject_after);
  for (auto [flag, value] :
       {std::pair{"eject-base-ms", &res.eject_base}, std::pair{"eject-max-ms", &res.eject_max},
        std::pair{"hedge-after-ms", &res.hedge_after}}) {
    ASSIGN_OR_RETURN(const int64_t ms, args.Int(flag, value->count()));
    if (ms < 0 || ms > 86400000) {
      return absl::InvalidArgumentError(absl::StrCat("--", flag, " must be in [0, 86400000]"));
    }
    *value = std::chrono::milliseconds(ms);
  }
  ASSIGN_OR_RETURN(res.eject_max_share, args.Double("eject-max-share", res.eject_max_share));
  ASSIGN_OR_RETURN(res.hedge_budget, args.Double("hedge-budget", res.hedge_budget));
  const std::string metrics_listen = args.String("metrics-listen", "");

  RouterServerOptions so;
  so.listen = args.String("listen", "127.0.0.1:0");
  so.model_name = args.String("model-name", "moe");
  so.security = security;
  ASSIGN_OR_RETURN(so.max_inflight_tokens, args.Int("max-inflight-tokens", 0));
  ASSIGN_OR_RETURN(so.max_message_bytes, ParseMessageLimit(args, so.max_message_bytes));

  // Declared before the router: its gauges read the router, so the exposer (declared
  // after) goes first.
  metrics::Registry registry;
  std::shared_ptr<RouterMetrics> router_metrics;
  if (!metrics_listen.empty()) {
    ASSIGN_OR_RETURN(auto ckpt, Checkpoint::Open(ro.model_dir));
    ASSIGN_OR_RETURN(MoeModelConfig config, ParseMoeModelConfig(ckpt->config()));
    ASSIGN_OR_RETURN(auto selection,
                     ExpertSeriesSelection::Parse(args.String("expert-metrics", "auto"), config));
    ASSIGN_OR_RETURN(router_metrics, RouterMetrics::Create(registry, config, std::move(selection)));
    RETURN_IF_ERROR(metrics::AddProcessMetrics(registry));
    RETURN_IF_ERROR(security->ExportMetrics(registry));
  }
  std::shared_ptr<ExpertTransport> transport =
      std::make_shared<GrpcExpertTransport>(GrpcTransportOptions{so.max_message_bytes, security});
  ASSIGN_OR_RETURN(const TransportFlags transport_flags,
                   ParseTransportFlags(args, kUcxDefaultSpin));
  if (transport_flags.ucx) {
    ASSIGN_OR_RETURN(transport, UcxExpertTransport::Create(transport, so.max_message_bytes,
                                                           transport_flags.ucx_spin));
  }
  ASSIGN_OR_RETURN(auto router, MoeRouter::Create(ro, transport, router_metrics));
  ASSIGN_OR_RETURN(auto server, RouterServer::Create(so, std::move(router)));
  std::unique_ptr<metrics::MetricsExposer> exposer;
  if (!metrics_listen.empty()) {
    // /readyz follows the gRPC health: the gates loaded, every expert endpoint reachable,
    // not draining.
    ASSIGN_OR_RETURN(exposer, metrics::ServeMetrics(metrics_listen, registry,
                                                    [&server] { return server->ready(); }));
  }
  std::unique_ptr<PlacementWatcher> watcher;
  if (!controller.empty()) {
    PlacementWatcherOptions wo;
    wo.controller = controller;
    wo.router_id = args.String("router-id", "");
    wo.security = security;
    wo.report_interval = report_interval;
    ASSIGN_OR_RETURN(watcher, PlacementWatcher::Start(wo, &server->router()));
  }
  ServeUntilStopSignal("router", so.listen, *server);
  return absl::OkStatus();
}

}  // namespace

int RouterMain(const std::vector<std::string>& args) {
  return RunServiceMain("router", kRouterUsage, args, Run);
}

}  // namespace moemesh
