#include "tools/demo.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <functional>
#include <map>
#include <random>
#include <set>
#include <thread>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "services/base/mutex.h"
#include "services/base/status_macros.h"
#include "services/mesh/placement.h"
#include "services/runtime/signals.h"
#include "tools/cli_common.h"
#include "tools/controlled_mesh.h"
#include "tools/load_driver.h"
#include "tools/local_mesh.h"
#include "tools/process.h"

namespace moemesh {
namespace {

using Clock = std::chrono::steady_clock;

absl::Status RunInProcessDemo(const std::vector<std::string>& argv) {
  std::set<std::string> flags = GenFlags();
  flags.erase("out");
  flags.insert({"model", "tokens", "iters", "capacity-factor", "expert-choice", "in-process"});
  const std::set<std::string> bools = {"expert-choice", "in-process"};
  ASSIGN_OR_RETURN(CliArgs args, CliArgs::Parse(argv, flags, bools));
  ASSIGN_OR_RETURN(int64_t tokens, args.Int("tokens", 64));
  ASSIGN_OR_RETURN(int64_t iters, args.Int("iters", 5));
  if (tokens <= 0 || iters <= 0)
    return absl::InvalidArgumentError("--tokens and --iters must be positive");
  ASSIGN_OR_RETURN(MoeLayerOptions options, LayerOptions(args));
  RemovedAtExit generated;
  ASSIGN_OR_RETURN(const std::string dir, DemoModelDir(argv, flags, bools, &generated));
  ASSIGN_OR_RETURN(LoadedModel m, LoadModel(dir));
  const MoeModelConfig& c = m.config;
  std::mt19937 rng(1);
  std::normal_distribution<float> nd;
  Tensor x = Tensor::Empty(DType::kF32, {tokens, c.hidden_size});
  for (int64_t i = 0; i < x.numel(); ++i) x.mutable_data<float>()[i] = nd(rng);
  for (int64_t layer : c.MoeLayers()) {
    ASSIGN_OR_RETURN(auto moe, MoeLayer::Create(*m.ckpt, c, layer, options));
    std::vector<int64_t> load(c.num_experts, 0);
    double best_ms = 1e30;
    int64_t dropped = 0;
    for (int64_t it = 0; it < iters; ++it) {
      const auto t0 = Clock::now();
      ASSIGN_OR_RETURN(MoeLayerOutput out, moe->Forward(x));
      best_ms =
          std::min(best_ms, std::chrono::duration<double, std::milli>(Clock::now() - t0).count());
      if (it == 0) {
        for (int64_t i = 0; i < out.topk_ids.numel(); ++i) {
          const int32_t e = out.topk_ids.data<int32_t>()[i];
          if (e >= 0) ++load[e];
        }
        dropped = out.dropped;
      }
    }
    std::printf(
        "layer %lld: %lld tokens in %.3f ms (%.0f tokens/s), weights %.1f MiB, %lld dropped\n",
        (long long)layer, (long long)tokens, best_ms, tokens / (best_ms / 1e3),
        moe->weight_bytes() / 1048576.0, (long long)dropped);
    std::printf("  load per expert:");
    for (int64_t e = 0; e < c.num_experts; ++e) std::printf(" %lld", (long long)load[e]);
    std::printf("\n");
  }
  return absl::OkStatus();
}

// Either mesh, seen the same way by the demo.
struct DemoMesh {
  std::unique_ptr<LocalMesh> local;            // --static
  std::unique_ptr<ControlledMesh> controlled;  // otherwise

  const std::string& router() const {
    return local ? local->router_endpoint() : controlled->router_endpoints()[0];
  }
  const std::string& router_metrics() const {
    return local ? local->router_metrics_url() : controlled->router_metrics_urls()[0];
  }
  const std::vector<std::string>& experts() const {
    return local ? local->expert_endpoints() : controlled->expert_endpoints();
  }
  std::vector<std::string> expert_metrics() const {
    if (local) return local->expert_metrics_urls();
    std::vector<std::string> urls;
    for (size_t i = 0; i < controlled->expert_endpoints().size(); ++i) {
      urls.push_back(controlled->expert_metrics_url(static_cast<int>(i)));
    }
    return urls;
  }
  absl::StatusOr<PlacementTable> placement(const MoeModelConfig& config) const {
    if (local) return local->placement();
    ASSIGN_OR_RETURN(const v1::ControllerState s, controlled->State());
    return PlacementTable::FromProto(s.placement(), config);
  }
};

// `requests` ModelInfer calls of `tokens` random tokens, layers in turn, from
// `concurrency` clients; every answer compared bit for bit with the in-process MoeLayer.
absl::Status CheckedWorkload(const DemoMesh& mesh, const LoadedModel& m, DType wire, int64_t tokens,
                             int64_t requests, int64_t concurrency) {
  const MoeModelConfig& c = m.config;
  MoeLayerOptions lo;
  lo.wire_dtype = wire;
  std::map<int64_t, std::unique_ptr<MoeLayer>> reference;
  for (int64_t layer : c.MoeLayers()) {
    ASSIGN_OR_RETURN(reference[layer], MoeLayer::Create(*m.ckpt, c, layer, lo));
  }
  std::vector<Tensor> inputs;
  std::mt19937 rng(7);
  std::normal_distribution<float> nd;
  for (int64_t r = 0; r < requests; ++r) {
    Tensor x = Tensor::Empty(DType::kF32, {tokens, c.hidden_size});
    for (int64_t i = 0; i < x.numel(); ++i) x.mutable_data<float>()[i] = nd(rng);
    inputs.push_back(std::move(x));
  }
  const std::vector<int64_t> layers = c.MoeLayers();
  std::atomic<int64_t> next{0}, mismatches{0}, failures{0};
  std::vector<double> latencies(requests);
  Mutex err_mu;
  std::string first_error;  // written holding err_mu
  const auto t0 = Clock::now();
  std::vector<std::thread> clients;
  for (int64_t w = 0; w < concurrency; ++w) {
    clients.emplace_back([&] {
      KServeClient client(mesh.router());
      for (int64_t r = next++; r < requests; r = next++) {
        const int64_t layer = layers[r % layers.size()];
        const auto s = Clock::now();
        auto got = client.Infer(inputs[r], layer, std::chrono::seconds(30), /*want_topk=*/false);
        latencies[r] = std::chrono::duration<double, std::micro>(Clock::now() - s).count();
        if (!got.ok()) {
          ++failures;
          MutexLock lock(&err_mu);
          if (first_error.empty()) first_error = got.status().ToString();
          continue;
        }
        auto want = reference.at(layer)->Forward(inputs[r]);
        if (!want.ok() || got->output.nbytes() != want->output.nbytes() ||
            std::memcmp(got->output.raw(), want->output.raw(), want->output.nbytes()) != 0) {
          ++mismatches;
        }
      }
    });
  }
  for (auto& t : clients) t.join();
  const double secs = std::chrono::duration<double>(Clock::now() - t0).count();
  // The reference runs inside the timed loop, so this is a lower bound on mesh speed.
  std::printf(
      "\n%lld requests x %lld tokens, %lld clients: %.0f tokens/s (including the in-process "
      "check)\n",
      (long long)requests, (long long)tokens, (long long)concurrency, requests * tokens / secs);
  std::printf("latency p50 %.0f us, p99 %.0f us\n", Percentile(latencies, 0.5),
              Percentile(latencies, 0.99));
  std::printf("answers identical to MoeLayer: %lld of %lld (%lld failed)\n",
              (long long)(requests - mismatches - failures), (long long)requests,
              (long long)failures.load());
  if (!first_error.empty()) std::printf("first error: %s\n", first_error.c_str());
  if (mismatches > 0 || failures > 0) {
    return absl::InternalError(absl::StrCat(
        mismatches.load(), " answers differed from MoeLayer and ", failures.load(), " failed"));
  }
  return absl::OkStatus();
}

absl::Status PrintLoadAndPlacement(const DemoMesh& mesh, const MoeModelConfig& c) {
  KServeClient control(mesh.router());
  ASSIGN_OR_RETURN(v1::ExpertLoad load, control.ExpertLoad());
  std::printf("\nrouted tokens per expert:\n");
  for (const auto& l : load.layers()) {
    std::printf("  layer %3lld:", (long long)l.layer());
    for (int64_t v : l.tokens()) std::printf(" %6lld", (long long)v);
    std::printf("   imbalance %.2f, balance statistic %.2f (last %.1f s)\n", l.imbalance(),
                l.balance_statistic(), l.window_seconds());
  }
  ASSIGN_OR_RETURN(const PlacementTable placement, mesh.placement(c));
  std::printf("\nplacement (epoch %llu):\n", (unsigned long long)placement.epoch());
  for (const std::string& ep : placement.endpoints()) {
    std::map<int64_t, std::vector<int32_t>> by_layer;
    for (const auto& [layer, e] : placement.ExpertsOf(ep)) by_layer[layer].push_back(e);
    if (by_layer.empty()) continue;
    const auto& first = by_layer.begin()->second;
    std::printf("  %s: %zu experts (layer %lld: %s)\n", ep.c_str(), placement.ExpertsOf(ep).size(),
                (long long)by_layer.begin()->first, absl::StrJoin(first, ",").c_str());
  }
  return absl::OkStatus();
}

void PrintServiceLoad(const char* title, const std::vector<std::string>& experts,
                      const ServiceBalance& b, double seconds) {
  std::printf("%s (tokens/s computed by each expert service):\n", title);
  for (size_t i = 0; i < experts.size(); ++i) {
    std::printf("  %-22s %8.0f\n", experts[i].c_str(), b.tokens[i] / seconds);
  }
  std::printf("  balance (mean/max over services): %.2f\n", b.mean_over_max);
}

// --skew: a few hot experts take 80% of the tokens; the controller is asked for a round
// (what `moemesh placement rebalance` does) and the load is measured before and after.
absl::Status SkewedRebalance(ControlledMesh& mesh, const DemoMesh& demo, const LoadedModel& m,
                             DType wire, int64_t tokens, int64_t concurrency) {
  const MoeModelConfig& c = m.config;
  // The hot experts: in every MoE layer, those the first service holds (at most 2), so
  // that one service starts with most of the work.
  ASSIGN_OR_RETURN(const PlacementTable placement, demo.placement(c));
  std::map<int64_t, std::vector<int32_t>> hot;
  for (const auto& [layer, e] : placement.ExpertsOf(demo.experts()[0])) {
    if (hot[layer].size() < 2) hot[layer].push_back(e);
  }
  ASSIGN_OR_RETURN(const TokenSkew skew, TokenSkew::HotPerLayer(*m.ckpt, c, hot, 0.8));
  std::string which;
  for (const auto& [layer, experts] : hot) {
    absl::StrAppend(&which, which.empty() ? "" : "; ", "layer ", layer, ": ",
                    absl::StrJoin(experts, ", "));
  }
  std::printf("\n--skew: the experts %s (held by %s) take 80%% of the tokens; %lld clients\n",
              which.c_str(), demo.experts()[0].c_str(), (long long)concurrency);
  LoadDriverOptions lo;
  lo.routers = mesh.router_endpoints();
  lo.clients = static_cast<int>(concurrency);
  lo.tokens = tokens;
  lo.wire = wire;
  ASSIGN_OR_RETURN(std::unique_ptr<LoadDriver> driver, LoadDriver::Start(lo, *m.ckpt, c, &skew));
  constexpr auto kWindow = std::chrono::seconds(3);
  const double window_s = std::chrono::duration<double>(kWindow).count();
  const std::vector<std::string> urls = demo.expert_metrics();
  std::this_thread::sleep_for(std::chrono::seconds(1));  // the routers' load windows fill
  ASSIGN_OR_RETURN(const ServiceBalance before, MeasureServiceBalance(urls, kWindow));
  PrintServiceLoad("\nbefore rebalancing", demo.experts(), before, window_s);

  std::printf("\nasking the controller for a round (as `moemesh placement rebalance` does)\n");
  ASSIGN_OR_RETURN(const v1::ControllerState state_before, mesh.State());
  const auto t0 = Clock::now();
  ASSIGN_OR_RETURN(const v1::RebalanceResponse r, mesh.Rebalance());
  const double round_s = std::chrono::duration<double>(Clock::now() - t0).count();
  ASSIGN_OR_RETURN(const v1::ControllerState state, mesh.State());
  std::printf(
      "moves: %lld replicas added, %lld removed, %.2f MiB of weights copied; epoch %llu in "
      "force at every router after %.2f s%s%s\n",
      (long long)r.added(), (long long)r.removed(),
      (state.bytes_moved() - state_before.bytes_moved()) / 1048576.0, (unsigned long long)r.epoch(),
      round_s, r.note().empty() ? "" : ": ", r.note().c_str());

  ASSIGN_OR_RETURN(const ServiceBalance after, MeasureServiceBalance(urls, kWindow));
  PrintServiceLoad("\nafter rebalancing", demo.experts(), after, window_s);
  driver->Stop();
  const LoadDriver::Totals t = driver->totals();
  std::printf(
      "\nrequests during the skewed run: %lld, failed %lld, answers differing from "
      "MoeLayer %lld\n",
      (long long)t.requests, (long long)t.failed, (long long)t.mismatched);
  if (!t.first_error.empty()) std::printf("first error: %s\n", t.first_error.c_str());
  if (t.failed > 0 || t.mismatched > 0) {
    return absl::InternalError(absl::StrCat(t.failed, " requests failed and ", t.mismatched,
                                            " answers differed during the skewed run"));
  }
  if (r.added() == 0) {
    return absl::InternalError(absl::StrCat("the controller moved nothing: ", r.note()));
  }
  return absl::OkStatus();
}

absl::Status RunMeshDemo(const std::vector<std::string>& argv) {
  std::set<std::string> flags = GenFlags();
  flags.erase("out");
  flags.insert({"model", "expert-services", "routers", "replicas", "placement", "static", "wire",
                "tokens", "requests", "concurrency", "serve", "port", "in-process", "transport",
                "skew"});
  const std::set<std::string> bools = {"serve", "in-process", "static", "skew"};
  ASSIGN_OR_RETURN(CliArgs args, CliArgs::Parse(argv, flags, bools));
  const bool controlled = !args.Has("static");
  const std::string transport = args.String("transport", "grpc");
  if (transport != "grpc" && transport != "ucx") {
    return absl::InvalidArgumentError("--transport must be grpc or ucx");
  }
  ASSIGN_OR_RETURN(int64_t services, args.Int("expert-services", 3));
  ASSIGN_OR_RETURN(int64_t routers, args.Int("routers", 1));
  ASSIGN_OR_RETURN(int64_t replicas, args.Int("replicas", 1));
  ASSIGN_OR_RETURN(int64_t port, args.Int("port", 0));
  ASSIGN_OR_RETURN(int64_t tokens, args.Int("tokens", 16));
  ASSIGN_OR_RETURN(int64_t requests, args.Int("requests", 64));
  ASSIGN_OR_RETURN(int64_t concurrency, args.Int("concurrency", 4));
  if (services < 1 || services > 64 || replicas < 1 || replicas > services || port < 0 ||
      port > 65535 || tokens < 1 || requests < 1 || concurrency < 1 || concurrency > 256 ||
      routers < 1 || routers > 16) {
    return absl::InvalidArgumentError(
        "need 1 <= --expert-services <= 64, 1 <= --replicas <= services, 1 <= --routers <= 16, "
        "a valid --port, positive --tokens/--requests and 1 <= --concurrency <= 256");
  }
  if (controlled && args.Has("placement")) {
    return absl::InvalidArgumentError(
        "--placement sets a fixed placement: it needs --static (otherwise the controller "
        "places the experts)");
  }
  if (!controlled && (args.Has("skew") || routers != 1)) {
    return absl::InvalidArgumentError("--skew and --routers need the controller (not --static)");
  }
  const std::string wire = absl::AsciiStrToLower(args.String("wire", "f32"));
  if (wire != "f32" && wire != "bf16")
    return absl::InvalidArgumentError("--wire must be f32 or bf16");
  const DType wire_dtype = wire == "bf16" ? DType::kBF16 : DType::kF32;

  RemovedAtExit generated;
  ASSIGN_OR_RETURN(const std::string dir, DemoModelDir(argv, flags, bools, &generated));
  ASSIGN_OR_RETURN(LoadedModel m, LoadModel(dir));

  DemoMesh mesh;
  if (controlled) {
    ControlledMeshOptions o;
    o.moemesh_binary = SelfExecutable();
    o.model_dir = dir;
    o.num_expert_services = static_cast<int>(services);
    o.num_routers = static_cast<int>(routers);
    o.min_replicas = static_cast<int>(replicas);
    o.wire = wire;
    o.transport = transport;
    o.metrics = true;
    o.router_port = static_cast<int>(port);
    // With --skew the demo asks for the round itself, between its two measurements.
    o.rebalance_interval_s = args.Has("skew") ? 0 : 10;
    o.load_window_s = 3;
    std::printf(
        "starting a placement controller, %d expert services and %d router(s) (min %d "
        "replica(s), %s wire)\n",
        o.num_expert_services, o.num_routers, o.min_replicas, wire.c_str());
    ASSIGN_OR_RETURN(mesh.controlled, ControlledMesh::Start(o));
    std::printf("controller at %s (metrics %s)\n", mesh.controlled->controller_endpoint().c_str(),
                mesh.controlled->controller_metrics_url().c_str());
    std::printf("router(s) (KServe v2 gRPC) at %s\n",
                absl::StrJoin(mesh.controlled->router_endpoints(), ", ").c_str());
  } else {
    LocalMeshOptions o;
    o.moemesh_binary = SelfExecutable();
    o.model_dir = dir;
    o.transport = transport;
    o.num_expert_services = static_cast<int>(services);
    o.metrics = true;
    o.replicas = static_cast<int>(replicas);
    o.router_port = static_cast<int>(port);
    ASSIGN_OR_RETURN(o.policy, ParsePlacementPolicy(args.String("placement", "contiguous")));
    o.wire = wire;
    std::printf(
        "starting %d expert services and a router (fixed %s placement, %d replica(s), %s wire)\n",
        o.num_expert_services, args.String("placement", "contiguous").c_str(), o.replicas,
        wire.c_str());
    ASSIGN_OR_RETURN(mesh.local, LocalMesh::Start(o));
    RETURN_IF_ERROR(mesh.local->WaitReady(std::chrono::seconds(60)));
    std::printf("router (KServe v2 gRPC) at %s\n", mesh.router().c_str());
  }
  std::printf("expert services at %s\n", absl::StrJoin(mesh.experts(), ", ").c_str());
  std::printf("metrics: router %s; expert services %s\n", mesh.router_metrics().c_str(),
              absl::StrJoin(mesh.expert_metrics(), ", ").c_str());

  const absl::Status checked = CheckedWorkload(mesh, m, wire_dtype, tokens, requests, concurrency);
  RETURN_IF_ERROR(PrintLoadAndPlacement(mesh, m.config));
  RETURN_IF_ERROR(checked);
  if (args.Has("skew")) {
    RETURN_IF_ERROR(SkewedRebalance(*mesh.controlled, mesh, m, wire_dtype, tokens, concurrency));
    RETURN_IF_ERROR(PrintLoadAndPlacement(mesh, m.config));
  }
  if (args.Has("serve")) {
    std::printf("\nserving: KServe v2 ModelInfer at %s (model 'moe'); Ctrl-C to stop\n",
                mesh.router().c_str());
    auto target = [](const std::string& url) { return absl::StrCat("'", MetricsTarget(url), "'"); };
    std::vector<std::string> experts;
    for (const std::string& url : mesh.expert_metrics()) experts.push_back(target(url));
    std::printf("metrics (Prometheus text format):\n  router  %s\n", mesh.router_metrics().c_str());
    for (const std::string& url : mesh.expert_metrics()) std::printf("  expert  %s\n", url.c_str());
    std::string controller_job;
    if (controlled) {
      std::printf("  controller  %s\n", mesh.controlled->controller_metrics_url().c_str());
      controller_job =
          absl::StrCat("    - job_name: moemesh-controller\n      static_configs: [{targets: [",
                       target(mesh.controlled->controller_metrics_url()), "]}]\n");
    }
    std::printf(
        "scrape them with this prometheus.yml (see deploy/README.md for Grafana):\n"
        "  scrape_configs:\n"
        "    - job_name: moemesh-router\n"
        "      static_configs: [{targets: [%s]}]\n"
        "    - job_name: moemesh-expert\n"
        "      static_configs: [{targets: [%s]}]\n%s",
        target(mesh.router_metrics()).c_str(), absl::StrJoin(experts, ", ").c_str(),
        controller_job.c_str());
    std::fflush(stdout);
    BlockStopSignals();
    WaitForStopSignal();
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status RunDemo(const std::vector<std::string>& argv) {
  for (const std::string& a : argv) {
    if (a == "--in-process") return RunInProcessDemo(argv);
  }
  return RunMeshDemo(argv);
}

}  // namespace moemesh
