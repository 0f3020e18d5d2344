// moemesh: the command line.
//   moemesh layer --model DIR --layer N --input IN.safetensors --output OUT.safetensors
//   moemesh gen-model --family F --out DIR [sizes]
//   moemesh demo [--model DIR] [--tokens T] [--iters N]
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <iostream>
#include <map>
#include <random>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "expert_service/expert_main.h"
#include "router_service/router_main.h"
#include "services/base/mutex.h"
#include "services/base/status_macros.h"
#include "services/model/checkpoint.h"
#include "services/model/model_config.h"
#include "services/model/model_generator.h"
#include "services/model/safetensors.h"
#include "services/moe/moe_layer.h"
#include "services/runtime/flags.h"
#include "services/runtime/serving_settings.h"
#include "services/runtime/signals.h"
#include "tools/local_mesh.h"
#include "tools/process.h"

namespace moemesh {
namespace {

constexpr char kUsage[] =
    "usage: moemesh <command> [flags]\n"
    "  layer      --model DIR --layer N --input IN.safetensors --output OUT.safetensors\n"
    "             [--capacity-factor F] [--expert-choice]\n"
    "             IN holds hidden_states [T,H] (F32, BF16 or F16); OUT receives output [T,H]\n"
    "             (same dtype), topk_ids I32 [T,k] and topk_weights F32 [T,k].\n"
    "  gen-model  --family F --out DIR [--hidden H] [--intermediate I] [--experts E]\n"
    "             [--top-k K] [--layers L] [--shared-intermediate S] [--groups G]\n"
    "             [--topk-groups G] [--dtype f32|bf16|f16] [--shards N] [--seed S]\n"
    "             writes a random checkpoint in the family's Hugging Face layout\n"
    "  demo       [--model DIR | --family F and gen-model sizes] [--expert-services N]\n"
    "             [--replicas R] [--placement contiguous|round-robin] [--wire f32|bf16]\n"
    "             [--tokens T] [--requests N] [--concurrency C] [--serve] [--port P]\n"
    "             [--transport grpc|ucx]\n"
    "             starts N expert services and a router on loopback, drives ModelInfer,\n"
    "             checks every answer against the in-process MoeLayer and reports;\n"
    "             --in-process [--iters N] runs the layers in this process instead\n"
    "  router     the router service (moemesh router --help)\n"
    "  expert     an expert service (moemesh expert --help)\n";

// Removes `dir` (when set) on destruction.
struct RemovedAtExit {
  std::string dir;
  ~RemovedAtExit() {
    std::error_code ignored;
    if (!dir.empty()) std::filesystem::remove_all(dir, ignored);
  }
};

absl::StatusOr<DType> ParseDType(const std::string& s) {
  const std::string l = absl::AsciiStrToLower(s);
  if (l == "f32" || l == "float32") return DType::kF32;
  if (l == "bf16" || l == "bfloat16") return DType::kBF16;
  if (l == "f16" || l == "float16") return DType::kF16;
  return absl::InvalidArgumentError(absl::StrCat("unknown dtype '", s, "' (want f32, bf16, f16)"));
}

struct LoadedModel {
  std::unique_ptr<Checkpoint> ckpt;
  MoeModelConfig config;
};

absl::StatusOr<LoadedModel> LoadModel(const std::string& dir) {
  LoadedModel m;
  ASSIGN_OR_RETURN(m.ckpt, Checkpoint::Open(dir));
  auto config = ParseMoeModelConfig(m.ckpt->config());
  if (!config.ok()) {
    return absl::Status(config.status().code(), absl::StrCat(dir, "/", config.status().message()));
  }
  m.config = *config;
  return m;
}

absl::StatusOr<MoeLayerOptions> LayerOptions(const CliArgs& args) {
  MoeLayerOptions o;
  ASSIGN_OR_RETURN(o.capacity_factor, args.Double("capacity-factor", 0.0));
  if (args.Has("expert-choice")) o.mode = RoutingMode::kExpertChoice;
  RETURN_IF_ERROR(o.Validate());
  return o;
}

absl::Status RunLayer(const std::vector<std::string>& argv) {
  ASSIGN_OR_RETURN(CliArgs args, CliArgs::Parse(argv,
                                                {"model", "layer", "input", "output",
                                                 "capacity-factor", "expert-choice"},
                                                {"expert-choice"}));
  ASSIGN_OR_RETURN(std::string model_dir, args.Required("model"));
  ASSIGN_OR_RETURN(std::string input, args.Required("input"));
  ASSIGN_OR_RETURN(std::string output, args.Required("output"));
  if (!args.Has("layer")) return absl::InvalidArgumentError("missing --layer");
  ASSIGN_OR_RETURN(int64_t layer, args.Int("layer", 0));
  ASSIGN_OR_RETURN(MoeLayerOptions options, LayerOptions(args));
  ASSIGN_OR_RETURN(LoadedModel m, LoadModel(model_dir));
  ASSIGN_OR_RETURN(auto moe, MoeLayer::Create(*m.ckpt, m.config, layer, options));
  ASSIGN_OR_RETURN(auto in, SafetensorsFile::Open(input));
  ASSIGN_OR_RETURN(Tensor hidden, in->Get("hidden_states"));
  auto out = moe->Forward(hidden);
  if (!out.ok()) {
    return absl::Status(out.status().code(), absl::StrCat(input, ": ", out.status().message()));
  }
  RETURN_IF_ERROR(WriteSafetensors(
      output,
      {{"output", out->output}, {"topk_ids", out->topk_ids}, {"topk_weights", out->topk_weights}}));
  std::fprintf(stderr, "layer %lld: %lld tokens -> %s (%lld slots dropped)\n",
               static_cast<long long>(layer), static_cast<long long>(hidden.dim(0)), output.c_str(),
               static_cast<long long>(out->dropped));
  return absl::OkStatus();
}

absl::StatusOr<GenModelOptions> GenOptions(const CliArgs& args) {
  GenModelOptions o;
  ASSIGN_OR_RETURN(std::string family, args.Required("family"));
  ASSIGN_OR_RETURN(o.family, FamilyFromName(family));
  ASSIGN_OR_RETURN(o.hidden, args.Int("hidden", o.hidden));
  ASSIGN_OR_RETURN(o.intermediate, args.Int("intermediate", o.intermediate));
  ASSIGN_OR_RETURN(o.experts, args.Int("experts", o.experts));
  ASSIGN_OR_RETURN(o.top_k, args.Int("top-k", o.top_k));
  ASSIGN_OR_RETURN(o.layers, args.Int("layers", o.layers));
  ASSIGN_OR_RETURN(o.shared_intermediate, args.Int("shared-intermediate", o.shared_intermediate));
  ASSIGN_OR_RETURN(o.num_groups, args.Int("groups", o.num_groups));
  ASSIGN_OR_RETURN(o.topk_groups, args.Int("topk-groups", o.topk_groups));
  ASSIGN_OR_RETURN(int64_t shards, args.Int("shards", o.shards));
  o.shards = static_cast<int>(std::clamp<int64_t>(shards, -1, 1 << 20));
  ASSIGN_OR_RETURN(int64_t seed, args.Int("seed", 0));
  o.seed = static_cast<uint64_t>(seed);
  ASSIGN_OR_RETURN(o.dtype, ParseDType(args.String("dtype", "bf16")));
  RETURN_IF_ERROR(o.Validate());
  return o;
}

const std::set<std::string> kGenFlags = {"family",  "out",         "hidden", "intermediate",
                                         "experts", "top-k",       "layers", "shared-intermediate",
                                         "groups",  "topk-groups", "dtype",  "shards",
                                         "seed"};

absl::Status RunGenModel(const std::vector<std::string>& argv) {
  ASSIGN_OR_RETURN(CliArgs args, CliArgs::Parse(argv, kGenFlags));
  ASSIGN_OR_RETURN(std::string out, args.Required("out"));
  ASSIGN_OR_RETURN(GenModelOptions o, GenOptions(args));
  RETURN_IF_ERROR(GenerateModel(out, o));
  std::printf("wrote %s checkpoint to %s\n", std::string(FamilyName(o.family)).c_str(),
              out.c_str());
  return absl::OkStatus();
}

absl::Status RunInProcessDemo(const std::vector<std::string>& argv) {
  std::set<std::string> flags = kGenFlags;
  flags.erase("out");
  flags.insert({"model", "tokens", "iters", "capacity-factor", "expert-choice", "in-process"});
  std::vector<std::string> with_family = argv;
  ASSIGN_OR_RETURN(CliArgs args, CliArgs::Parse(argv, flags, {"expert-choice", "in-process"}));
  ASSIGN_OR_RETURN(int64_t tokens, args.Int("tokens", 64));
  ASSIGN_OR_RETURN(int64_t iters, args.Int("iters", 5));
  if (tokens <= 0 || iters <= 0)
    return absl::InvalidArgumentError("--tokens and --iters must be positive");
  ASSIGN_OR_RETURN(MoeLayerOptions options, LayerOptions(args));
  std::string dir = args.String("model", "");
  RemovedAtExit generated;  // a model generated here goes however the demo ends
  if (dir.empty()) {
    if (!args.Has("family")) with_family.push_back("--family=mixtral");
    ASSIGN_OR_RETURN(CliArgs gen_args,
                     CliArgs::Parse(with_family, flags, {"expert-choice", "in-process"}));
    ASSIGN_OR_RETURN(GenModelOptions o, GenOptions(gen_args));
    dir = (std::filesystem::temp_directory_path() /
           absl::StrCat("moemesh-demo-", FamilyName(o.family), "-", ::getpid()))
              .string();
    RETURN_IF_ERROR(GenerateModel(dir, o));
    generated.dir = dir;
    std::printf("generated %s model in %s (H=%lld I=%lld E=%lld k=%lld, %lld layers)\n",
                std::string(FamilyName(o.family)).c_str(), dir.c_str(), (long long)o.hidden,
                (long long)o.intermediate, (long long)o.experts, (long long)o.top_k,
                (long long)o.layers);
  }
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
      const auto t0 = std::chrono::steady_clock::now();
      ASSIGN_OR_RETURN(MoeLayerOutput out, moe->Forward(x));
      best_ms = std::min(
          best_ms,
          std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
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

double Percentile(std::vector<double> v, double p) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  return v[std::min(v.size() - 1, static_cast<size_t>(p * (v.size() - 1) + 0.5))];
}

// The main job: a mesh on loopback, driven through KServe ModelInfer, every answer
// checked bit for bit against the in-process MoeLayer on the same wire dtype.
absl::Status RunMeshDemo(const std::vector<std::string>& argv) {
  std::set<std::string> flags = kGenFlags;
  flags.erase("out");
  flags.insert({"model", "expert-services", "replicas", "placement", "wire", "tokens", "requests",
                "concurrency", "serve", "port", "in-process", "transport"});
  ASSIGN_OR_RETURN(CliArgs args, CliArgs::Parse(argv, flags, {"serve", "in-process"}));
  LocalMeshOptions mo;
  mo.transport = args.String("transport", "grpc");
  if (mo.transport != "grpc" && mo.transport != "ucx") {
    return absl::InvalidArgumentError("--transport must be grpc or ucx");
  }
  mo.moemesh_binary = SelfExecutable();
  ASSIGN_OR_RETURN(int64_t services, args.Int("expert-services", 3));
  ASSIGN_OR_RETURN(int64_t replicas, args.Int("replicas", 1));
  ASSIGN_OR_RETURN(int64_t port, args.Int("port", 0));
  ASSIGN_OR_RETURN(int64_t tokens, args.Int("tokens", 16));
  ASSIGN_OR_RETURN(int64_t requests, args.Int("requests", 64));
  ASSIGN_OR_RETURN(int64_t concurrency, args.Int("concurrency", 4));
  if (services < 1 || services > 64 || replicas < 1 || replicas > services || port < 0 ||
      port > 65535 || tokens < 1 || requests < 1 || concurrency < 1 || concurrency > 256) {
    return absl::InvalidArgumentError(
        "need 1 <= --expert-services <= 64, 1 <= --replicas <= services, a valid --port, "
        "positive --tokens/--requests and 1 <= --concurrency <= 256");
  }
  mo.num_expert_services = static_cast<int>(services);
  mo.metrics = true;
  mo.replicas = static_cast<int>(replicas);
  mo.router_port = static_cast<int>(port);
  ASSIGN_OR_RETURN(mo.policy, ParsePlacementPolicy(args.String("placement", "contiguous")));
  mo.wire = absl::AsciiStrToLower(args.String("wire", "f32"));
  if (mo.wire != "f32" && mo.wire != "bf16")
    return absl::InvalidArgumentError("--wire must be f32 or bf16");

  std::string dir = args.String("model", "");
  RemovedAtExit generated;  // a model generated here goes however the demo ends
  if (dir.empty()) {
    std::vector<std::string> gen = argv;
    if (!args.Has("family")) gen.push_back("--family=mixtral");
    ASSIGN_OR_RETURN(CliArgs gen_args, CliArgs::Parse(gen, flags, {"serve", "in-process"}));
    ASSIGN_OR_RETURN(GenModelOptions o, GenOptions(gen_args));
    dir = (std::filesystem::temp_directory_path() /
           absl::StrCat("moemesh-demo-", FamilyName(o.family), "-", ::getpid()))
              .string();
    RETURN_IF_ERROR(GenerateModel(dir, o));
    generated.dir = dir;
    std::printf("generated a %s model in %s (H=%lld I=%lld E=%lld k=%lld, %lld layers)\n",
                FamilyName(o.family), dir.c_str(), (long long)o.hidden, (long long)o.intermediate,
                (long long)o.experts, (long long)o.top_k, (long long)o.layers);
  }
  mo.model_dir = dir;
  ASSIGN_OR_RETURN(LoadedModel m, LoadModel(dir));
  const MoeModelConfig& c = m.config;

  // Reference layers, computed in this process with the mesh's wire rounding.
  MoeLayerOptions lo;
  lo.wire_dtype = mo.wire == "bf16" ? DType::kBF16 : DType::kF32;
  std::map<int64_t, std::unique_ptr<MoeLayer>> reference;
  for (int64_t layer : c.MoeLayers()) {
    ASSIGN_OR_RETURN(reference[layer], MoeLayer::Create(*m.ckpt, c, layer, lo));
  }

  std::printf("starting %d expert services and a router (%s placement, %d replica(s), %s wire)\n",
              mo.num_expert_services, args.String("placement", "contiguous").c_str(), mo.replicas,
              mo.wire.c_str());
  ASSIGN_OR_RETURN(auto mesh, LocalMesh::Start(mo));
  RETURN_IF_ERROR(mesh->WaitReady(std::chrono::seconds(60)));
  std::printf("router (KServe v2 gRPC) at %s; expert services at %s\n",
              mesh->router_endpoint().c_str(),
              absl::StrJoin(mesh->expert_endpoints(), ", ").c_str());
  std::printf("metrics: router %s; expert services %s\n", mesh->router_metrics_url().c_str(),
              absl::StrJoin(mesh->expert_metrics_urls(), ", ").c_str());

  // Workload: `requests` calls of `tokens` tokens, layers in turn, `concurrency` clients.
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
  const auto t0 = std::chrono::steady_clock::now();
  std::vector<std::thread> clients;
  for (int64_t w = 0; w < concurrency; ++w) {
    clients.emplace_back([&] {
      KServeClient client(mesh->router_endpoint());
      for (int64_t r = next++; r < requests; r = next++) {
        const int64_t layer = layers[r % layers.size()];
        const auto s = std::chrono::steady_clock::now();
        auto got = client.Infer(inputs[r], layer, std::chrono::seconds(30), /*want_topk=*/false);
        latencies[r] =
            std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - s).count();
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
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
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

  KServeClient control(mesh->router_endpoint());
  ASSIGN_OR_RETURN(v1::ExpertLoad load, control.ExpertLoad());
  std::printf("\nrouted tokens per expert:\n");
  for (const auto& l : load.layers()) {
    std::printf("  layer %3lld:", (long long)l.layer());
    for (int64_t v : l.tokens()) std::printf(" %6lld", (long long)v);
    std::printf("   imbalance %.2f, balance statistic %.2f (last %.1f s)\n", l.imbalance(),
                l.balance_statistic(), l.window_seconds());
  }
  std::printf("\nplacement (epoch %llu):\n", (unsigned long long)mesh->placement().epoch());
  for (const std::string& ep : mesh->placement().endpoints()) {
    std::map<int64_t, std::vector<int32_t>> by_layer;
    for (const auto& [layer, e] : mesh->placement().ExpertsOf(ep)) by_layer[layer].push_back(e);
    const auto& first = by_layer.begin()->second;
    std::printf("  %s: %zu experts (layer %lld: %s)\n", ep.c_str(),
                mesh->placement().ExpertsOf(ep).size(), (long long)by_layer.begin()->first,
                absl::StrJoin(first, ",").c_str());
  }
  if (args.Has("serve")) {
    std::printf("\nserving: KServe v2 ModelInfer at %s (model 'moe'); Ctrl-C to stop\n",
                mesh->router_endpoint().c_str());
    auto target = [](const std::string& url) { return absl::StrCat("'", MetricsTarget(url), "'"); };
    std::vector<std::string> experts;
    for (const std::string& url : mesh->expert_metrics_urls()) experts.push_back(target(url));
    std::printf("metrics (Prometheus text format):\n  router  %s\n",
                mesh->router_metrics_url().c_str());
    for (const std::string& url : mesh->expert_metrics_urls())
      std::printf("  expert  %s\n", url.c_str());
    std::printf(
        "scrape them with this prometheus.yml (see deploy/README.md for Grafana):\n"
        "  scrape_configs:\n"
        "    - job_name: moemesh-router\n"
        "      static_configs: [{targets: [%s]}]\n"
        "    - job_name: moemesh-expert\n"
        "      static_configs: [{targets: [%s]}]\n",
        target(mesh->router_metrics_url()).c_str(), absl::StrJoin(experts, ", ").c_str());
    std::fflush(stdout);
    BlockStopSignals();
    WaitForStopSignal();
  }
  if (mismatches > 0 || failures > 0) {
    return absl::InternalError(absl::StrCat(
        mismatches.load(), " answers differed from MoeLayer and ", failures.load(), " failed"));
  }
  return absl::OkStatus();
}

absl::Status RunDemo(const std::vector<std::string>& argv) {
  for (const std::string& a : argv) {
    if (a == "--in-process") return RunInProcessDemo(argv);
  }
  return RunMeshDemo(argv);
}

}  // namespace
}  // namespace moemesh

int main(int argc, char** argv) {
  moemesh::ConfigureForServing();
  if (argc < 2 || std::string(argv[1]) == "--help" || std::string(argv[1]) == "help") {
    std::fputs(moemesh::kUsage, argc < 2 ? stderr : stdout);
    return argc < 2 ? 2 : 0;
  }
  const std::string cmd = argv[1];
  const std::vector<std::string> rest(argv + 2, argv + argc);
  absl::Status st;
  if (cmd == "layer") {
    st = moemesh::RunLayer(rest);
  } else if (cmd == "gen-model") {
    st = moemesh::RunGenModel(rest);
  } else if (cmd == "demo") {
    st = moemesh::RunDemo(rest);
  } else if (cmd == "router") {
    return moemesh::RouterMain(rest);
  } else if (cmd == "expert") {
    return moemesh::ExpertServiceMain(rest);
  } else {
    std::fprintf(stderr, "moemesh: unknown command '%s'\n%s", cmd.c_str(), moemesh::kUsage);
    return 2;
  }
  if (!st.ok()) {
    std::fprintf(stderr, "moemesh %s: %s\n", cmd.c_str(), std::string(st.ToString()).c_str());
    return 1;
  }
  return 0;
}
