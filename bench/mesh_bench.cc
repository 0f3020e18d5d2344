// mesh_bench: the mesh (router + expert services on loopback, KServe ModelInfer) against
// the in-process MoeLayer on the same model and inputs, in one run, for each wire dtype.
//
//   mesh_bench [--model DIR | generated Mixtral-like H=1024 I=3584 E=8 k=2]
//              [--tokens 1,16,256,2048] [--repeats N] [--expert-services N]
//   mesh_bench --metrics-cost [--tokens 256] [--repeats N]
//   mesh_bench --compare-transports [--tokens 1,16,256,2048] [--repeats N]
//   mesh_bench --tls-cost [--transport grpc|ucx] [--tokens 1,256] [--repeats N]
//   mesh_bench --overload [--tokens 64] [--seconds S]
//   mesh_bench --arena-cost [--tokens 1,256] [--repeats N] [--clients C]
//
// Prints one JSON line per (wire, T): medians of the in-process layer and of a mesh call
// (one client, calls back to back), the throughput ratio in-process/mesh time and the
// latency the mesh adds. Needs the moemesh binary next to it (MOEMESH_BINARY).
//
// --metrics-cost: the price of metrics. Two meshes of the same model run side by side,
// one with every service serving metrics (scraped every second, as a pessimistic
// Prometheus would) and one without; calls alternate between them, so both see the
// same machine noise. Prints the median call time of each and their ratio.
//
// --compare-transports: the same model in a mesh with token data over gRPC and in one
// over UCX (bf16 wire), calls alternating with the in-process layer; prints medians and
// the latency each data plane adds.
//
// --tls-cost: the price of security. Two meshes side by side, one plaintext and one with
// mutual TLS on every port and the admin identity checked on every call (certificates
// made with openssl); the client calls both, alternating. With --transport ucx the token
// data goes over UCX in both (TLS then covers the control plane only). Prints per T the
// medians and their ratio.
//
// --overload: admission control under twice the load admitted. The router admits one call
// at a time (--max-inflight-tokens T); one client measures the unloaded latencies, then two
// clients send back to back (2x overload; a refused client waits 5 ms before it tries
// again). Prints the admitted calls' p50/p99 against the unloaded ones, the share shed, the
// slowest call (nothing hangs), and the same overload on a router without the bound.
//
// --arena-cost: the price of the services' malloc arena cap (services/runtime/
// serving_settings.h). Two meshes side by side, one with glibc's default arena count
// (MALLOC_ARENA_MAX=8 per core set for its processes) and one with the cap; per T, one
// client alternating between them (median call time), then C clients at once on one mesh
// and then the other, in turn, `repeats` rounds of 20 calls each (median calls/s).
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <functional>
#include <random>
#include <thread>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "services/base/mutex.h"
#include "services/base/status_macros.h"
#include "services/model/checkpoint.h"
#include "services/model/model_generator.h"
#include "services/moe/moe_layer.h"
#include "services/runtime/flags.h"
#include "services/runtime/serving_settings.h"
#include "services/transport/grpc_transport.h"
#include "services/transport/transport.h"
#include "tools/http_client.h"
#include "tools/local_mesh.h"
#include "tools/test_certs.h"

namespace moemesh {
namespace {

using Clock = std::chrono::steady_clock;

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

Tensor RandomInput(int64_t T, int64_t H) {
  Tensor x = Tensor::Empty(DType::kF32, {T, H});
  std::mt19937 rng(static_cast<uint32_t>(T));
  std::normal_distribution<float> nd;
  for (int64_t i = 0; i < x.numel(); ++i) x.mutable_data<float>()[i] = nd(rng);
  return x;
}

// A mesh of the model on loopback, ready: `services` expert services, each on all cores
// as deployed; `edit` sets the rest.
absl::StatusOr<std::unique_ptr<LocalMesh>> StartMesh(
    const std::string& binary, const std::string& dir, int64_t services,
    const std::function<void(LocalMeshOptions&)>& edit) {
  LocalMeshOptions mo;
  mo.moemesh_binary = binary;
  mo.model_dir = dir;
  mo.num_expert_services = static_cast<int>(services);
  mo.expert_threads = 0;
  edit(mo);
  ASSIGN_OR_RETURN(auto mesh, LocalMesh::Start(mo));
  RETURN_IF_ERROR(mesh->WaitReady(std::chrono::seconds(120)));
  return mesh;
}

// Calls clients[0] and clients[1] in turn (which goes first alternates), `repeats` times
// each after 2 warm-ups: the median call time of each, in ms.
absl::StatusOr<std::pair<double, double>> AlternatingMedians(KServeClient (&clients)[2],
                                                             const Tensor& x, int64_t layer,
                                                             int64_t repeats) {
  std::vector<double> ms[2];
  for (int64_t r = -2; r < repeats; ++r) {  // r < 0: warm-up
    for (int k = 0; k < 2; ++k) {
      const int which = (r + k) % 2 == 0 ? 0 : 1;
      const auto t0 = Clock::now();
      auto got = clients[which].Infer(x, layer, std::chrono::seconds(120), false);
      const double m = std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
      if (!got.ok()) return got.status();
      if (r >= 0) ms[which].push_back(m);
    }
  }
  return std::pair{Median(ms[0]), Median(ms[1])};
}

// For each T of `tokens`: a random input x, AlternatingMedians of the two clients on it,
// and `report(T, x, median ms of clients[0], of clients[1])`. Stops at the first error.
absl::Status CompareEachT(
    KServeClient (&clients)[2], const MoeModelConfig& c, const std::vector<int64_t>& tokens,
    int64_t repeats,
    const std::function<absl::Status(int64_t T, const Tensor& x, double ms0, double ms1)>& report) {
  const int64_t layer = c.MoeLayers().front();
  for (int64_t T : tokens) {
    const Tensor x = RandomInput(T, c.hidden_size);
    ASSIGN_OR_RETURN(const auto medians, AlternatingMedians(clients, x, layer, repeats));
    RETURN_IF_ERROR(report(T, x, medians.first, medians.second));
    std::fflush(stdout);
  }
  return absl::OkStatus();
}

absl::Status MetricsCost(const std::string& binary, const std::string& dir, const MoeModelConfig& c,
                         const std::vector<int64_t>& tokens, int64_t repeats, int64_t services) {
  std::unique_ptr<LocalMesh> meshes[2];  // [0] metrics off, [1] on
  for (int on = 0; on < 2; ++on) {
    ASSIGN_OR_RETURN(meshes[on], StartMesh(binary, dir, services,
                                           [&](LocalMeshOptions& mo) { mo.metrics = on == 1; }));
  }
  std::vector<std::string> urls = meshes[1]->expert_metrics_urls();
  urls.push_back(meshes[1]->router_metrics_url());
  std::atomic<bool> done{false};
  std::atomic<int64_t> scrapes{0};
  std::thread scraper([&] {
    while (!done) {
      for (const std::string& url : urls) {
        if (HttpGet(url).ok()) ++scrapes;
      }
      for (int i = 0; i < 20 && !done; ++i)
        std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
  });
  KServeClient clients[2] = {KServeClient(meshes[0]->router_endpoint(), 1 << 30),
                             KServeClient(meshes[1]->router_endpoint(), 1 << 30)};
  const absl::Status status = CompareEachT(
      clients, c, tokens, repeats, [&](int64_t T, const Tensor&, double off, double on) {
        std::printf(
            "{\"T\":%lld,\"metrics_off_ms\":%.3f,\"metrics_on_ms\":%.3f,"
            "\"throughput_ratio_on_off\":%.4f,\"repeats\":%lld,\"scrapes\":%lld}\n",
            (long long)T, off, on, off / on, (long long)repeats, (long long)scrapes.load());
        return absl::OkStatus();
      });
  done = true;
  scraper.join();
  return status;
}

// Two meshes of the same model, token data over gRPC in one and over UCX in the other
// (UCX_TLS from the environment), calls alternating between them and the in-process
// layer, so all three see the same machine noise. Prints per T the medians and the
// latency each data plane adds to the in-process layer.
absl::Status CompareTransports(const std::string& binary, const std::string& dir,
                               const MoeModelConfig& c, MoeLayer& moe,
                               const std::vector<int64_t>& tokens, int64_t repeats,
                               int64_t services) {
  const int64_t layer = c.MoeLayers().front();
  const char* names[2] = {"grpc", "ucx"};
  std::unique_ptr<LocalMesh> meshes[2];
  for (int k = 0; k < 2; ++k) {
    ASSIGN_OR_RETURN(meshes[k], StartMesh(binary, dir, services, [&](LocalMeshOptions& mo) {
                       mo.transport = names[k];
                       mo.wire = "bf16";
                     }));
  }
  KServeClient clients[2] = {KServeClient(meshes[0]->router_endpoint(), 1 << 30),
                             KServeClient(meshes[1]->router_endpoint(), 1 << 30)};
  for (int64_t T : tokens) {
    const Tensor x = RandomInput(T, c.hidden_size);
    const int64_t reps = std::max<int64_t>(5, T >= 1024 ? repeats / 4 : repeats);
    std::vector<double> ms[2], local_ms;
    for (int64_t r = -2; r < reps; ++r) {  // r < 0: warm-up
      auto t0 = Clock::now();
      ASSIGN_OR_RETURN(MoeLayerOutput want, moe.Forward(x));
      if (r >= 0)
        local_ms.push_back(std::chrono::duration<double, std::milli>(Clock::now() - t0).count());
      for (int k = 0; k < 2; ++k) {
        const int which = (r + k) % 2 == 0 ? 0 : 1;  // alternate which goes first
        t0 = Clock::now();
        ASSIGN_OR_RETURN(auto got,
                         clients[which].Infer(x, layer, std::chrono::seconds(120), false));
        const double m = std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
        if (std::memcmp(got.output.raw(), want.output.raw(), want.output.nbytes()) != 0) {
          return absl::InternalError(
              absl::StrCat("the ", names[which], " mesh differs from MoeLayer at T=", T));
        }
        if (r >= 0) ms[which].push_back(m);
      }
    }
    const double lm = Median(local_ms), g = Median(ms[0]), u = Median(ms[1]);
    std::printf(
        "{\"T\":%lld,\"inprocess_ms\":%.3f,\"grpc_mesh_ms\":%.3f,\"ucx_mesh_ms\":%.3f,"
        "\"grpc_added_us\":%.0f,\"ucx_added_us\":%.0f,\"throughput_ratio_ucx_grpc\":%.3f,"
        "\"repeats\":%lld}\n",
        (long long)T, lm, g, u, (g - lm) * 1e3, (u - lm) * 1e3, g / u, (long long)reps);
    std::fflush(stdout);
  }
  return absl::OkStatus();
}

absl::Status TlsCost(const std::string& binary, const std::string& dir, const MoeModelConfig& c,
                     const std::vector<int64_t>& tokens, int64_t repeats, int64_t services,
                     const std::string& transport) {
  const std::string pki =
      (std::filesystem::temp_directory_path() / absl::StrCat("mesh_bench_pki_", ::getpid()))
          .string();
  ASSIGN_OR_RETURN(TestCa ca, TestCa::Create(pki, "bench-ca"));
  ASSIGN_OR_RETURN(TestCertificate leaf, ca.Issue("mesh", kLoopbackSans));
  const std::vector<std::string> flags = {"--tls-cert",  leaf.cert,  "--tls-key",       leaf.key,
                                          "--tls-ca",    ca.cert(),  "--tls-client-ca", ca.cert(),
                                          "--admin-san", "localhost"};
  SecurityOptions so;
  so.tls_cert = leaf.cert;
  so.tls_key = leaf.key;
  so.tls_ca = ca.cert();
  ASSIGN_OR_RETURN(std::shared_ptr<Security> security, Security::Create(so));
  std::unique_ptr<LocalMesh> meshes[2];  // [0] plaintext, [1] mutual TLS
  for (int on = 0; on < 2; ++on) {
    ASSIGN_OR_RETURN(meshes[on], StartMesh(binary, dir, services, [&](LocalMeshOptions& mo) {
                       mo.transport = transport;
                       if (on == 1) {
                         mo.router_flags = mo.expert_flags = flags;
                         mo.client_security = security;
                       }
                     }));
  }
  KServeClient clients[2] = {KServeClient(meshes[0]->router_endpoint(), 1 << 30),
                             KServeClient(meshes[1]->router_endpoint(), 1 << 30, security)};
  const absl::Status status = CompareEachT(
      clients, c, tokens, repeats, [&](int64_t T, const Tensor&, double off, double on) {
        std::printf(
            "{\"transport\":\"%s\",\"T\":%lld,\"plaintext_ms\":%.3f,\"mtls_ms\":%.3f,"
            "\"throughput_ratio_mtls_plaintext\":%.4f,\"repeats\":%lld}\n",
            transport.c_str(), (long long)T, off, on, off / on, (long long)repeats);
        return absl::OkStatus();
      });
  std::error_code ec;
  std::filesystem::remove_all(pki, ec);
  return status;
}

double Percentile(std::vector<double> v, double q) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  return v[std::min(v.size() - 1, static_cast<size_t>(q * static_cast<double>(v.size())))];
}

// `clients` threads calling back to back for `seconds`: admitted latencies (ms), calls shed
// (RESOURCE_EXHAUSTED), other failures, the slowest call.
struct OverloadRun {
  std::vector<double> admitted_ms;
  int64_t shed = 0, failed = 0;
  double slowest_ms = 0;
  std::string first_error;
};

OverloadRun Drive(const std::string& router, const Tensor& x, int64_t layer, int clients,
                  double seconds) {
  OverloadRun run;
  Mutex mu;
  const auto end = Clock::now() + std::chrono::milliseconds(static_cast<int64_t>(seconds * 1000));
  std::vector<std::thread> threads;
  for (int i = 0; i < clients; ++i) {
    threads.emplace_back([&] {
      KServeClient client(router, 1 << 30);
      while (Clock::now() < end) {
        const auto t0 = Clock::now();
        auto got = client.Infer(x, layer, std::chrono::seconds(30), false);
        const double ms = std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
        MutexLock lock(&mu);
        run.slowest_ms = std::max(run.slowest_ms, ms);
        if (got.ok()) {
          run.admitted_ms.push_back(ms);
        } else if (got.status().code() == absl::StatusCode::kResourceExhausted) {
          ++run.shed;
          mu.Unlock();
          std::this_thread::sleep_for(std::chrono::milliseconds(5));
          mu.Lock();
        } else {
          if (run.failed++ == 0) run.first_error = got.status().ToString();
        }
      }
    });
  }
  for (auto& t : threads) t.join();
  return run;
}

absl::Status ArenaCost(const std::string& binary, const std::string& dir, const MoeModelConfig& c,
                       const std::vector<int64_t>& tokens, int64_t repeats, int64_t services,
                       int64_t concurrency) {
  const int64_t layer = c.MoeLayers().front();
  const std::string glibc_default = std::to_string(8 * std::thread::hardware_concurrency());
  std::unique_ptr<LocalMesh> meshes[2];  // [0] glibc's default, [1] the cap
  for (int k = 0; k < 2; ++k) {
    // The children inherit the environment; a set MALLOC_ARENA_MAX overrides the cap.
    if (k == 0) ::setenv("MALLOC_ARENA_MAX", glibc_default.c_str(), 1);
    absl::StatusOr<std::unique_ptr<LocalMesh>> mesh =
        StartMesh(binary, dir, services, [](LocalMeshOptions&) {});
    ::unsetenv("MALLOC_ARENA_MAX");
    if (!mesh.ok()) return mesh.status();
    meshes[k] = *std::move(mesh);
  }
  KServeClient clients[2] = {KServeClient(meshes[0]->router_endpoint(), 1 << 30),
                             KServeClient(meshes[1]->router_endpoint(), 1 << 30)};
  return CompareEachT(
      clients, c, tokens, repeats,
      [&](int64_t T, const Tensor& x, double default_ms, double capped_ms) {
        // C clients at once: calls/s of a round of 20 calls each, rounds alternating.
        constexpr int kCallsPerClient = 20;
        std::vector<double> rate[2];
        for (int64_t r = -1; r < repeats; ++r) {  // r < 0: warm-up
          for (int k = 0; k < 2; ++k) {
            const int which = (r + k) % 2 == 0 ? 0 : 1;
            std::atomic<int64_t> failed{0};
            const auto t0 = Clock::now();
            std::vector<std::thread> threads;
            for (int64_t i = 0; i < concurrency; ++i) {
              threads.emplace_back([&] {
                for (int j = 0; j < kCallsPerClient; ++j) {
                  if (!clients[which].Infer(x, layer, std::chrono::seconds(120), false).ok())
                    ++failed;
                }
              });
            }
            for (std::thread& t : threads) t.join();
            const double s = std::chrono::duration<double>(Clock::now() - t0).count();
            if (failed > 0)
              return absl::InternalError(absl::StrCat(failed.load(), " calls failed"));
            if (r >= 0) rate[which].push_back(concurrency * kCallsPerClient / s);
          }
        }
        const double d = Median(rate[0]), a = Median(rate[1]);
        std::printf(
            "{\"T\":%lld,\"default_arenas\":%s,\"capped_arenas\":%d,\"default_ms\":%.3f,"
            "\"capped_ms\":%.3f,\"latency_ratio_capped_default\":%.4f,\"clients\":%lld,"
            "\"default_calls_per_s\":%.1f,\"capped_calls_per_s\":%.1f,"
            "\"throughput_ratio_capped_default\":%.4f,\"repeats\":%lld}\n",
            (long long)T, glibc_default.c_str(), kMallocArenas, default_ms, capped_ms,
            capped_ms / default_ms, (long long)concurrency, d, a, a / d, (long long)repeats);
        return absl::OkStatus();
      });
}

absl::Status Overload(const std::string& binary, const std::string& dir, const MoeModelConfig& c,
                      int64_t T, double seconds, int64_t services) {
  const int64_t layer = c.MoeLayers().front();
  const Tensor x = RandomInput(T, c.hidden_size);
  ASSIGN_OR_RETURN(auto bounded, StartMesh(binary, dir, services, [&](LocalMeshOptions& mo) {
                     mo.router_flags = {"--max-inflight-tokens", absl::StrCat(T)};
                   }));
  Drive(bounded->router_endpoint(), x, layer, 1, 1);  // warm-up
  const OverloadRun unloaded = Drive(bounded->router_endpoint(), x, layer, 1, seconds);
  const OverloadRun over = Drive(bounded->router_endpoint(), x, layer, 2, seconds);
  bounded.reset();
  ASSIGN_OR_RETURN(auto open, StartMesh(binary, dir, services, [](LocalMeshOptions&) {}));
  Drive(open->router_endpoint(), x, layer, 1, 1);  // warm-up
  const OverloadRun unbounded = Drive(open->router_endpoint(), x, layer, 2, seconds);
  const auto share = [](const OverloadRun& r) {
    const double all = static_cast<double>(r.admitted_ms.size() + r.shed);
    return all > 0 ? static_cast<double>(r.shed) / all : 0.0;
  };
  const double p99_unloaded = Percentile(unloaded.admitted_ms, 0.99);
  std::printf(
      "{\"T\":%lld,\"unloaded_p50_ms\":%.2f,\"unloaded_p99_ms\":%.2f,"
      "\"overload_admitted_p50_ms\":%.2f,\"overload_admitted_p99_ms\":%.2f,"
      "\"p99_ratio_admitted_unloaded\":%.3f,\"shed_share\":%.3f,\"failed\":%lld,"
      "\"slowest_ms\":%.1f,\"unbounded_p99_ms\":%.2f,\"p99_ratio_unbounded_unloaded\":%.3f,"
      "\"calls\":%zu}\n",
      (long long)T, Percentile(unloaded.admitted_ms, 0.5), p99_unloaded,
      Percentile(over.admitted_ms, 0.5), Percentile(over.admitted_ms, 0.99),
      Percentile(over.admitted_ms, 0.99) / p99_unloaded, share(over),
      (long long)(over.failed + unloaded.failed + unbounded.failed),
      std::max(over.slowest_ms, unbounded.slowest_ms), Percentile(unbounded.admitted_ms, 0.99),
      Percentile(unbounded.admitted_ms, 0.99) / p99_unloaded, over.admitted_ms.size());
  if (!over.first_error.empty())
    std::fprintf(stderr, "first error: %s\n", over.first_error.c_str());
  return absl::OkStatus();
}

absl::Status Run(int argc, char** argv) {
  ASSIGN_OR_RETURN(
      CliArgs args,
      CliArgs::Parse(std::vector<std::string>(argv + 1, argv + argc),
                     {"model", "tokens", "repeats", "expert-services", "moemesh", "metrics-cost",
                      "compare-transports", "tls-cost", "transport", "overload", "seconds",
                      "arena-cost", "clients"},
                     {"metrics-cost", "compare-transports", "tls-cost", "overload", "arena-cost"}));
  std::string dir = args.String("model", "");
  if (dir.empty()) {
    dir = (std::filesystem::temp_directory_path() / "mesh_bench_model").string();
    if (!std::filesystem::exists(dir + "/config.json")) {
      GenModelOptions g;
      g.hidden = 1024;
      g.intermediate = 3584;
      g.experts = 8;
      g.top_k = 2;
      g.layers = 1;
      g.dtype = DType::kBF16;
      RETURN_IF_ERROR(GenerateModel(dir, g));
    }
  }
  std::vector<int64_t> tokens;
  for (absl::string_view s :
       absl::StrSplit(args.String("tokens", args.Has("metrics-cost") ? "256"
                                            : args.Has("tls-cost") || args.Has("arena-cost")
                                                ? "1,256"
                                                : "1,16,256,2048"),
                      ',')) {
    int64_t t;
    if (!absl::SimpleAtoi(s, &t) || t <= 0) return absl::InvalidArgumentError("bad --tokens");
    tokens.push_back(t);
  }
  ASSIGN_OR_RETURN(int64_t repeats, args.Int("repeats", 20));
  ASSIGN_OR_RETURN(int64_t services, args.Int("expert-services", 2));
  ASSIGN_OR_RETURN(auto ckpt, Checkpoint::Open(dir));
  ASSIGN_OR_RETURN(MoeModelConfig c, ParseMoeModelConfig(ckpt->config()));
  const int64_t layer = c.MoeLayers().front();
  if (args.Has("metrics-cost")) {
    return MetricsCost(args.String("moemesh", MOEMESH_BINARY), dir, c, tokens, repeats, services);
  }
  if (args.Has("overload")) {
    ASSIGN_OR_RETURN(const double seconds, args.Double("seconds", 10));
    return Overload(args.String("moemesh", MOEMESH_BINARY), dir, c,
                    args.Has("tokens") ? tokens.front() : 64, seconds, services);
  }
  if (args.Has("arena-cost")) {
    ASSIGN_OR_RETURN(const int64_t clients, args.Int("clients", 4));
    return ArenaCost(args.String("moemesh", MOEMESH_BINARY), dir, c, tokens, repeats, services,
                     clients);
  }
  if (args.Has("tls-cost")) {
    return TlsCost(args.String("moemesh", MOEMESH_BINARY), dir, c, tokens, repeats, services,
                   args.String("transport", "grpc"));
  }
  if (args.Has("compare-transports")) {
    MoeLayerOptions lo;
    lo.wire_dtype = DType::kBF16;
    ASSIGN_OR_RETURN(auto moe, MoeLayer::Create(*ckpt, c, layer, lo));
    return CompareTransports(args.String("moemesh", MOEMESH_BINARY), dir, c, *moe, tokens, repeats,
                             services);
  }

  for (const std::string wire : {"f32", "bf16"}) {
    MoeLayerOptions lo;
    lo.wire_dtype = wire == "f32" ? DType::kF32 : DType::kBF16;
    ASSIGN_OR_RETURN(auto moe, MoeLayer::Create(*ckpt, c, layer, lo));
    ASSIGN_OR_RETURN(auto mesh, StartMesh(args.String("moemesh", MOEMESH_BINARY), dir, services,
                                          [&](LocalMeshOptions& mo) { mo.wire = wire; }));
    KServeClient client(mesh->router_endpoint(), 1 << 30);
    {
      // The floor under the T=1 figure: the mesh's layer call is two round trips (client
      // to router, router to expert service), each an empty gRPC call at least. Timed
      // with 2 ms pauses, as between the layer calls below, so the peers are idle.
      GrpcExpertTransport expert_client;
      v1::InfoResponse info;
      std::vector<double> router_us, expert_us;
      for (int i = 0; i < 200; ++i) {
        std::this_thread::sleep_for(std::chrono::milliseconds(2));
        auto t0 = Clock::now();
        RETURN_IF_ERROR(client.ServerReady().status());
        router_us.push_back(std::chrono::duration<double, std::micro>(Clock::now() - t0).count());
        std::this_thread::sleep_for(std::chrono::milliseconds(2));
        t0 = Clock::now();
        RETURN_IF_ERROR(
            expert_client.Info(mesh->expert_endpoints().front(), v1::InfoRequest(),
                               std::chrono::system_clock::now() + std::chrono::seconds(5), &info));
        expert_us.push_back(std::chrono::duration<double, std::micro>(Clock::now() - t0).count());
      }
      std::printf("{\"wire\":\"%s\",\"empty_rtt_router_us\":%.0f,\"empty_rtt_expert_us\":%.0f}\n",
                  wire.c_str(), Median(router_us), Median(expert_us));
    }
    for (int64_t T : tokens) {
      Tensor x = Tensor::Empty(DType::kF32, {T, c.hidden_size});
      std::mt19937 rng(static_cast<uint32_t>(T));
      std::normal_distribution<float> nd;
      for (int64_t i = 0; i < x.numel(); ++i) x.mutable_data<float>()[i] = nd(rng);
      const int64_t reps = std::max<int64_t>(3, T >= 1024 ? repeats / 4 : repeats);
      std::vector<double> local_ms, mesh_ms;
      for (int64_t r = -1; r < reps; ++r) {  // r = -1: warm-up
        auto t0 = Clock::now();
        ASSIGN_OR_RETURN(MoeLayerOutput want, moe->Forward(x));
        const double l = std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
        t0 = Clock::now();
        ASSIGN_OR_RETURN(auto got, client.Infer(x, layer, std::chrono::seconds(120), false));
        const double m = std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
        if (std::memcmp(got.output.raw(), want.output.raw(), want.output.nbytes()) != 0) {
          return absl::InternalError(absl::StrCat("mesh answer differs from MoeLayer at T=", T));
        }
        if (r < 0) continue;
        local_ms.push_back(l);
        mesh_ms.push_back(m);
      }
      const double lm = Median(local_ms), mm = Median(mesh_ms);
      std::printf(
          "{\"wire\":\"%s\",\"T\":%lld,\"inprocess_ms\":%.3f,\"mesh_ms\":%.3f,"
          "\"throughput_ratio\":%.3f,\"added_us\":%.0f,\"repeats\":%lld}\n",
          wire.c_str(), (long long)T, lm, mm, lm / mm, (mm - lm) * 1e3, (long long)reps);
      std::fflush(stdout);
    }
  }
  return absl::OkStatus();
}

}  // namespace
}  // namespace moemesh

int main(int argc, char** argv) {
  moemesh::ConfigureForServing();  // as the services do: both sides alike
  const absl::Status s = moemesh::Run(argc, argv);
  if (!s.ok()) {
    std::fprintf(stderr, "mesh_bench: %s\n", std::string(s.ToString()).c_str());
    return 1;
  }
  return 0;
}
