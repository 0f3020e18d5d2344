#include "expert_service/expert_main.h"

#include <cstdio>
#include <memory>

#include "absl/strings/str_cat.h"
#include "expert_service/controller_agent.h"
#include "expert_service/expert_server.h"
#include "services/base/status_macros.h"
#include "services/metrics/exposer.h"
#include "services/model/checkpoint.h"
#include "services/runtime/flags.h"
#include "services/runtime/service_main.h"

namespace moemesh {
namespace {

constexpr char kUsage[] =
    "moemesh expert --model DIR [--listen HOST:PORT] [--service-id ID]\n"
    "  [--experts all|none|E0-E1,E|L:E0-E1;L:E,...] [--max-message-mb N] [--threads N]\n"
    "  --experts: what to load at start (default all): every expert of every MoE layer,\n"
    "  none, the listed experts of every MoE layer, or per layer\n"
    "  [--metrics-listen HOST:PORT] [--expert-metrics auto|all|sum|L,L] [--transport grpc|ucx]\n"
    "  [--ucx-spin-us US] [--device cpu|cuda] [--gpu N[,N...]] [--gpu-rebalance-s S]\n"
    "  [--fault-delay-ms MS] [--controller H:P] [--advertise H:P] [--leave-timeout-s S]\n"
    "  --threads: compute threads (default MOEMESH_THREADS or every core)\n"
    "  --metrics-listen: serve Prometheus metrics at http://HOST:PORT/metrics (port 0: any)\n"
    "  --expert-metrics: which per-expert series to export (docs/metrics.md; default auto)\n"
    "  --transport ucx: also serve Compute over UCX (its worker address goes out in Info;\n"
    "    UCX_TLS etc. from the environment)\n"
    "  --ucx-spin-us: how long the UCX worker polls after its last message before it sleeps\n"
    "    (default 1000; 0: never)\n"
    "  --device cuda: compute the experts on GPU N (--gpu, default 0), BF16 weights resident\n"
    "    there (default cpu: float32, bit-identical to the in-process layer); several GPUs\n"
    "    (--gpu 0,1,2,3): the experts spread over them, moved between them over NCCL every\n"
    "    --gpu-rebalance-s seconds (default 5; 0: never) when their load is uneven\n"
    "  --controller: register with the placement controller at H:P, which tells the service\n"
    "    what to load (--experts then defaults to none); on SIGTERM the controller moves its\n"
    "    experts elsewhere first (up to --leave-timeout-s, default 60), then it drains\n"
    "  --advertise: the address routers and the controller reach it at (default --listen)\n"
    "  --fault-delay-ms MS: fault injection for drills and tests: every Compute waits MS\n"
    "    before it computes (default 0)\n";

absl::Status Run(const std::vector<std::string>& argv) {
  ASSIGN_OR_RETURN(
      CliArgs args,
      CliArgs::Parse(argv, WithSecurityFlags({"model", "listen", "service-id", "experts",
                                              "max-message-mb", "threads", "metrics-listen",
                                              "expert-metrics", "transport", "ucx-spin-us",
                                              "device", "gpu", "gpu-rebalance-s", "fault-delay-ms",
                                              "controller", "advertise", "leave-timeout-s"})));
  ExpertServerOptions o;
  ASSIGN_OR_RETURN(o.model_dir, args.Required("model"));
  ASSIGN_OR_RETURN(o.security, SecurityFromFlags(args));
  o.listen = args.String("listen", o.listen);
  o.service_id = args.String("service-id", o.service_id);
  ASSIGN_OR_RETURN(o.max_message_bytes, ParseMessageLimit(args, o.max_message_bytes));
  ASSIGN_OR_RETURN(const TransportFlags transport, ParseTransportFlags(args, o.ucx_spin));
  o.ucx = transport.ucx;
  o.ucx_spin = transport.ucx_spin;
  ASSIGN_OR_RETURN(o.gpus, ParseDeviceFlags(args));
  ASSIGN_OR_RETURN(o.gpu_rebalance_interval, args.Seconds("gpu-rebalance-s", 5.0, 0, 86400));
  const std::string controller = args.String("controller", "");
  ASSIGN_OR_RETURN(const std::chrono::milliseconds leave_timeout,
                   args.Seconds("leave-timeout-s", 60.0, 0, 3600));
  ASSIGN_OR_RETURN(const int64_t fault_delay_ms, args.Int("fault-delay-ms", 0));
  if (fault_delay_ms < 0 || fault_delay_ms > 600000) {
    return absl::InvalidArgumentError("--fault-delay-ms must be in [0, 600000]");
  }
  o.fault_delay = std::chrono::milliseconds(fault_delay_ms);
  ASSIGN_OR_RETURN(int64_t threads, args.Int("threads", 0));
  if (threads < 0 || threads > 1024)
    return absl::InvalidArgumentError("--threads must be in [0, 1024]");
  {
    // The spec needs the model's MoE layers and expert count. Opening reads only
    // headers; Create opens the checkpoint again for the weights.
    ASSIGN_OR_RETURN(std::unique_ptr<Checkpoint> ckpt, Checkpoint::Open(o.model_dir));
    ASSIGN_OR_RETURN(MoeModelConfig config, ParseMoeModelConfig(ckpt->config()));
    ASSIGN_OR_RETURN(
        o.experts,
        ParseExpertSpec(args.String("experts", controller.empty() ? "all" : "none"), config));
  }

  std::unique_ptr<ThreadPool> pool;
  if (threads > 0) {
    pool = std::make_unique<ThreadPool>(static_cast<int>(threads));
    o.pool = pool.get();
  }
  // Declared before the server, whose gauges it reads; the exposer (after) goes first.
  metrics::Registry registry;
  const std::string metrics_listen = args.String("metrics-listen", "");
  if (!metrics_listen.empty()) {
    o.registry = &registry;
    o.expert_metrics = args.String("expert-metrics", "auto");
    RETURN_IF_ERROR(metrics::AddProcessMetrics(registry));
  }
  ASSIGN_OR_RETURN(std::unique_ptr<ExpertServer> server, ExpertServer::Create(o));
  std::unique_ptr<metrics::MetricsExposer> exposer;
  if (!metrics_listen.empty()) {
    // /readyz follows the gRPC health: SERVING from here on, until the drain starts.
    ASSIGN_OR_RETURN(exposer, metrics::ServeMetrics(metrics_listen, registry,
                                                    [&server] { return server->serving(); }));
  }
  std::fprintf(stderr, "expert service %s: %lld experts, %.1f MiB of weights\n",
               o.service_id.c_str(), static_cast<long long>(server->store().size()),
               server->store().weight_bytes() / 1048576.0);
  std::unique_ptr<ControllerAgent> agent;
  if (!controller.empty()) {
    ControllerAgentOptions ao;
    ao.controller = controller;
    ao.service_id = o.service_id;
    ao.security = o.security;
    // Port 0 in --listen means the bound port: the advertised address names the real one.
    const std::string host = o.listen.substr(0, o.listen.rfind(':'));
    ao.endpoint = args.String("advertise", absl::StrCat(host, ":", server->port()));
    ASSIGN_OR_RETURN(agent, ControllerAgent::Start(ao, server.get()));
  }
  ServeUntilStopSignal("expert service", o.listen, *server, [&] {
    if (agent == nullptr) return;
    // Its experts move to other services first: nothing routes here when the drain starts.
    const auto deadline = std::chrono::system_clock::now() + leave_timeout;
    if (const absl::Status s = agent->Leave(deadline); !s.ok()) {
      std::fprintf(stderr,
                   "expert service %s: no handover (%s); routers still sending here are "
                   "answered until the drain ends, then retry elsewhere\n",
                   o.service_id.c_str(), s.ToString().c_str());
    }
  });
  return absl::OkStatus();
}

}  // namespace

int ExpertServiceMain(const std::vector<std::string>& args) {
  return RunServiceMain("expert", kUsage, args, Run);
}

}  // namespace moemesh
