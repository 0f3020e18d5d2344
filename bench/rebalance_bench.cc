// rebalance_bench: the placement controller moving experts under load, on loopback.
//
//   rebalance_bench [--moemesh PATH] [--rounds 4] [--services 4] [--routers 2]
//                   [--clients 4] [--tokens 16] [--zipf 1.2] [--hidden 512]
//                   [--intermediate 1024] [--experts 16] [--layers 2] [--quick]
//
// A generated Mixtral-layout model, a controller, `services` expert services and `routers`
// routers (separate processes), and a load driver sending Zipf-skewed tokens through both
// routers, every answer checked bit for bit against the in-process MoeLayer. Each round
// switches the load to a new Zipf permutation (other experts hot), lets the routers' load
// windows fill, measures the steady state on the placement in force for `steady` seconds,
// asks the controller for a rebalance, and keeps measuring for one second after the new
// epoch is in force. Per round, one JSON line: the service-level balance (mean/max of the
// tokens each service computed) before and after, replicas moved and bytes copied, the
// round's duration and its time per moved expert, and ModelInfer p50/p99 in the steady
// window and in the window around the move (round start to one second after it), with
// their ratio. A summary line gives the medians and the failed and mismatched requests.
// --quick: one short round (CI runs it so that this benchmark keeps working).
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "nlohmann/json.hpp"
#include "services/base/status_macros.h"
#include "services/model/model_generator.h"
#include "services/model/moe_weights.h"
#include "services/runtime/flags.h"
#include "tools/controlled_mesh.h"
#include "tools/load_driver.h"

#ifndef MOEMESH_BINARY
#define MOEMESH_BINARY "moemesh"
#endif

namespace moemesh {
namespace {

using Clock = std::chrono::steady_clock;
namespace fs = std::filesystem;

double Median(std::vector<double> v) { return Percentile(std::move(v), 0.5); }

// Latencies (ms) of the requests that completed within [from, to) seconds of the start.
std::vector<double> LatenciesIn(const std::vector<LoadDriver::Sample>& samples, double from,
                                double to) {
  std::vector<double> out;
  for (const LoadDriver::Sample& s : samples) {
    if (s.at_s >= from && s.at_s < to) out.push_back(s.latency_ms);
  }
  return out;
}

absl::Status Run(const CliArgs& args) {
  const bool quick = args.Has("quick");
  ASSIGN_OR_RETURN(const int64_t rounds, args.Int("rounds", quick ? 1 : 4));
  ASSIGN_OR_RETURN(const int64_t services, args.Int("services", 4));
  ASSIGN_OR_RETURN(const int64_t routers, args.Int("routers", 2));
  ASSIGN_OR_RETURN(const int64_t clients, args.Int("clients", 4));
  ASSIGN_OR_RETURN(const int64_t tokens, args.Int("tokens", 16));
  ASSIGN_OR_RETURN(const double zipf, args.Double("zipf", 1.2));
  GenModelOptions g = SmallModelOptions(ModelFamily::kMixtral);
  ASSIGN_OR_RETURN(g.hidden, args.Int("hidden", quick ? 64 : 512));
  ASSIGN_OR_RETURN(g.intermediate, args.Int("intermediate", quick ? 128 : 1024));
  ASSIGN_OR_RETURN(g.experts, args.Int("experts", quick ? 8 : 16));
  ASSIGN_OR_RETURN(g.layers, args.Int("layers", 2));
  g.dtype = DType::kBF16;
  if (rounds < 1 || services < 2 || routers < 1 || clients < 1 || tokens < 1 || zipf <= 0) {
    return absl::InvalidArgumentError(
        "need --rounds >= 1, --services >= 2, --routers >= 1, --clients >= 1, --tokens >= 1, "
        "--zipf > 0");
  }
  const double steady_s = quick ? 2 : 4;

  const std::string dir =
      (fs::temp_directory_path() / absl::StrCat("rebalance_bench_", ::getpid())).string();
  struct Cleanup {
    std::string dir;
    ~Cleanup() {
      std::error_code ignored;
      fs::remove_all(dir, ignored);
    }
  } cleanup{dir};
  ASSIGN_OR_RETURN(GeneratedModel m, GenerateAndOpen(dir, g));

  ControlledMeshOptions o;
  o.moemesh_binary = args.String("moemesh", MOEMESH_BINARY);
  o.model_dir = m.dir;
  o.num_expert_services = static_cast<int>(services);
  o.num_routers = static_cast<int>(routers);
  o.metrics = true;
  o.rebalance_interval_s = 0;  // rounds on request only: the bench times them
  o.load_window_s = 3;
  o.load_report_s = 0.3;
  ASSIGN_OR_RETURN(std::unique_ptr<ControlledMesh> mesh, ControlledMesh::Start(o));
  std::vector<std::string> urls;
  for (int i = 0; i < static_cast<int>(services); ++i) urls.push_back(mesh->expert_metrics_url(i));

  std::vector<TokenSkew> skews;
  for (int64_t r = 0; r < rounds; ++r) {
    ASSIGN_OR_RETURN(TokenSkew s, TokenSkew::Zipf(*m.ckpt, m.config, zipf, 100 + r));
    skews.push_back(std::move(s));
  }
  LoadDriverOptions lo;
  lo.routers = mesh->router_endpoints();
  lo.clients = static_cast<int>(clients);
  lo.tokens = tokens;
  ASSIGN_OR_RETURN(std::unique_ptr<LoadDriver> driver,
                   LoadDriver::Start(lo, *m.ckpt, m.config, &skews[0]));

  std::vector<double> ratios_p99, ratios_p50, per_expert_s, balance_before, balance_after;
  for (int64_t r = 0; r < rounds; ++r) {
    driver->SetSkew(&skews[r]);
    std::this_thread::sleep_for(std::chrono::milliseconds(3500));  // windows fill: 3 s
    const double steady_from = driver->elapsed_s();
    ASSIGN_OR_RETURN(const ServiceBalance before,
                     MeasureServiceBalance(
                         urls, std::chrono::milliseconds(static_cast<int64_t>(steady_s * 1000))));
    const double steady_to = driver->elapsed_s();
    ASSIGN_OR_RETURN(const v1::ControllerState s0, mesh->State());
    const double move_from = driver->elapsed_s();
    const auto t0 = Clock::now();
    ASSIGN_OR_RETURN(const v1::RebalanceResponse rebalance, mesh->Rebalance());
    const double round_s = std::chrono::duration<double>(Clock::now() - t0).count();
    ASSIGN_OR_RETURN(const v1::ControllerState s1, mesh->State());
    std::this_thread::sleep_for(std::chrono::seconds(1));
    const double move_to = driver->elapsed_s();
    ASSIGN_OR_RETURN(const ServiceBalance after,
                     MeasureServiceBalance(
                         urls, std::chrono::milliseconds(static_cast<int64_t>(steady_s * 1000))));
    const std::vector<LoadDriver::Sample> samples = driver->samples();
    const std::vector<double> steady = LatenciesIn(samples, steady_from, steady_to);
    const std::vector<double> around = LatenciesIn(samples, move_from, move_to);
    const double sp50 = Percentile(steady, 0.5), sp99 = Percentile(steady, 0.99);
    const double mp50 = Percentile(around, 0.5), mp99 = Percentile(around, 0.99);
    nlohmann::json j;
    j["round"] = r;
    j["balance_before"] = before.mean_over_max;
    j["balance_after"] = after.mean_over_max;
    j["replicas_added"] = rebalance.added();
    j["replicas_removed"] = rebalance.removed();
    j["bytes_moved"] = s1.bytes_moved() - s0.bytes_moved();
    j["round_s"] = round_s;
    j["s_per_moved_expert"] = rebalance.added() > 0 ? round_s / rebalance.added() : 0.0;
    j["steady_requests"] = steady.size();
    j["steady_p50_ms"] = sp50;
    j["steady_p99_ms"] = sp99;
    j["move_requests"] = around.size();
    j["move_p50_ms"] = mp50;
    j["move_p99_ms"] = mp99;
    j["p99_ratio"] = sp99 > 0 ? mp99 / sp99 : 0.0;
    j["note"] = rebalance.note();
    std::printf("%s\n", j.dump().c_str());
    std::fflush(stdout);
    balance_before.push_back(before.mean_over_max);
    balance_after.push_back(after.mean_over_max);
    if (sp99 > 0) ratios_p99.push_back(mp99 / sp99);
    if (sp50 > 0) ratios_p50.push_back(mp50 / sp50);
    if (rebalance.added() > 0) per_expert_s.push_back(round_s / rebalance.added());
  }
  driver->Stop();
  const LoadDriver::Totals t = driver->totals();
  nlohmann::json summary;
  summary["summary"] = true;
  summary["rounds"] = rounds;
  summary["median_balance_before"] = Median(balance_before);
  summary["median_balance_after"] = Median(balance_after);
  summary["median_p50_ratio"] = Median(ratios_p50);
  summary["median_p99_ratio"] = Median(ratios_p99);
  summary["median_s_per_moved_expert"] = Median(per_expert_s);
  summary["expert_bytes"] = ExpertBytes(m.config);
  summary["requests"] = t.requests;
  summary["failed"] = t.failed;
  summary["mismatched"] = t.mismatched;
  std::printf("%s\n", summary.dump().c_str());
  if (t.failed > 0 || t.mismatched > 0) {
    return absl::InternalError(absl::StrCat(t.failed, " requests failed, ", t.mismatched,
                                            " answers differed: ", t.first_error));
  }
  if (per_expert_s.empty()) return absl::InternalError("no round moved an expert");
  return absl::OkStatus();
}

}  // namespace
}  // namespace moemesh

int main(int argc, char** argv) {
  absl::StatusOr<moemesh::CliArgs> args =
      moemesh::CliArgs::Parse(std::vector<std::string>(argv + 1, argv + argc),
                              {"moemesh", "rounds", "services", "routers", "clients", "tokens",
                               "zipf", "hidden", "intermediate", "experts", "layers", "quick"},
                              {"quick"});
  absl::Status s = args.ok() ? moemesh::Run(*args) : args.status();
  if (!s.ok()) {
    std::fprintf(stderr, "rebalance_bench: %s\n", s.ToString().c_str());
    return 1;
  }
  return 0;
}
