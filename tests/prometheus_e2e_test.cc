// Observability end to end: a mesh of real processes serving metrics, Debian's
// `prometheus` scraping it on loopback with the shipped recording and alerting rules,
// a deliberately skewed workload, and assertions made through Prometheus' HTTP query
// API: the hot experts show up as hot, the imbalance gauge moves, and every query of
// the shipped Grafana dashboard returns data. A second mesh, run by the placement
// controller, shows a rebalancing round in the controller's metrics and dashboard row.
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <random>
#include <thread>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "services/model/model_generator.h"
#include "services/moe/moe_gate.h"
#include "tools/controlled_mesh.h"
#include "tools/dashboard.h"
#include "tools/http_client.h"
#include "tools/load_driver.h"
#include "tools/local_mesh.h"
#include "tools/process.h"

#ifndef MOEMESH_BINARY
#error "MOEMESH_BINARY must name the moemesh executable"
#endif

namespace moemesh {
namespace {

namespace fs = std::filesystem;
using std::chrono::milliseconds;
using std::chrono::seconds;

// Layer → the expert its skewed inputs are built to pick.
const std::map<int64_t, int32_t> kHot = {{0, 3}, {1, 6}};
constexpr char kRateWindow[] = "5s";

std::string PrometheusBinary() {
  for (const char* p : {"/usr/bin/prometheus", "/usr/local/bin/prometheus"}) {
    if (fs::exists(p)) return p;
  }
  return "";
}

int FreePort() {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof a;
  if (::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0 ||
      ::getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len) != 0) {
    ::close(fd);
    return 0;
  }
  ::close(fd);
  return ntohs(a.sin_port);
}

struct Series {
  std::map<std::string, std::string> labels;
  double value = 0;
};

class Prometheus {
 public:
  explicit Prometheus(int port) : base_(absl::StrCat("http://127.0.0.1:", port)) {}

  // An instant query (at `time`, seconds since the epoch, when given).
  absl::StatusOr<std::vector<Series>> Query(const std::string& expr, double time = 0) const {
    std::string url = absl::StrCat(base_, "/api/v1/query?query=", UrlEncode(expr));
    if (time > 0) absl::StrAppend(&url, "&time=", std::to_string(time));
    auto reply = HttpGet(url);
    if (!reply.ok()) return reply.status();
    const auto json = nlohmann::json::parse(reply->body, nullptr, false);
    if (json.is_discarded() || json.value("status", "") != "success") {
      return absl::InternalError(absl::StrCat("query '", expr, "' failed: HTTP ", reply->status,
                                              " ", reply->body.substr(0, 400)));
    }
    std::vector<Series> out;
    const auto& data = json["data"];
    if (data["resultType"] == "scalar") {
      out.push_back({{}, std::stod(data["result"][1].get<std::string>())});
      return out;
    }
    for (const auto& r : data["result"]) {
      Series s;
      for (const auto& [k, v] : r["metric"].items()) s.labels[k] = v.get<std::string>();
      s.value = std::stod(r["value"][1].get<std::string>());
      out.push_back(std::move(s));
    }
    return out;
  }

  // The single value of `expr`; NaN when it has no series.
  double Value(const std::string& expr, double time = 0) const {
    auto r = Query(expr, time);
    EXPECT_TRUE(r.ok()) << r.status();
    if (!r.ok() || r->empty()) return std::nan("");
    EXPECT_EQ(r->size(), 1u) << expr;
    return r->front().value;
  }

  // Polls `expr` until it has a series for which `ok` holds.
  bool WaitFor(const std::string& expr, const std::function<bool(const Series&)>& ok,
               seconds timeout) const {
    const auto end = std::chrono::steady_clock::now() + timeout;
    while (std::chrono::steady_clock::now() < end) {
      auto r = Query(expr);
      if (r.ok()) {
        for (const Series& s : *r) {
          if (ok(s)) return true;
        }
      }
      std::this_thread::sleep_for(milliseconds(250));
    }
    return false;
  }

  const std::string& base() const { return base_; }

 private:
  std::string base_;
};

double NowSeconds() {
  return std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
}

// Debian's prometheus on a free loopback port, scraping every second with the shipped
// rules: `jobs` maps a job name to its targets (HOST:PORT). Waits until it is ready.
absl::Status StartPrometheus(const std::string& dir,
                             const std::map<std::string, std::vector<std::string>>& jobs,
                             std::unique_ptr<ChildProcess>* process,
                             std::unique_ptr<Prometheus>* prometheus) {
  const std::string binary = PrometheusBinary();
  if (binary.empty()) {
    return absl::FailedPreconditionError(
        "Debian's prometheus is not installed (tools/install_deps.sh installs it)");
  }
  std::vector<std::string> rules;
  for (const auto& f : fs::directory_iterator("deploy/prometheus/rules")) {
    if (f.path().extension() == ".yml")
      rules.push_back(absl::StrCat("'", fs::absolute(f.path()).string(), "'"));
  }
  if (rules.empty()) {
    return absl::NotFoundError("no deploy/prometheus/rules/*.yml (run from the source root)");
  }
  const std::string config = (fs::path(dir) / "prometheus.yml").string();
  std::ofstream out(config);
  out << "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
      << "rule_files: [" << absl::StrJoin(rules, ", ") << "]\n"
      << "scrape_configs:\n";
  for (const auto& [job, targets] : jobs) {
    std::vector<std::string> quoted;
    for (const std::string& t : targets) quoted.push_back(absl::StrCat("'", t, "'"));
    out << "  - job_name: " << job << "\n    static_configs: [{targets: ["
        << absl::StrJoin(quoted, ", ") << "]}]\n";
  }
  out.close();
  const int port = FreePort();
  if (port <= 0) return absl::UnavailableError("no free port");
  auto p = ChildProcess::Start({binary, absl::StrCat("--config.file=", config),
                                absl::StrCat("--storage.tsdb.path=", dir, "/tsdb"),
                                absl::StrCat("--web.listen-address=127.0.0.1:", port),
                                "--log.level=warn"});
  if (!p.ok()) return p.status();
  *process = *std::move(p);
  *prometheus = std::make_unique<Prometheus>(port);
  for (int i = 0; i < 120; ++i) {
    auto r = HttpGet(absl::StrCat((*prometheus)->base(), "/-/ready"), seconds(2));
    if (r.ok() && r->status == 200) return absl::OkStatus();
    std::this_thread::sleep_for(milliseconds(250));
  }
  return absl::DeadlineExceededError(
      absl::StrCat("prometheus did not become ready on port ", port));
}

// The shipped dashboard's queries, variables substituted for a scrape every second.
std::vector<PanelQuery> DashboardQueries() {
  auto dashboard = LoadDashboard("deploy/grafana/moemesh-dashboard.json");
  EXPECT_TRUE(dashboard.ok()) << dashboard.status();
  if (!dashboard.ok()) return {};
  const std::map<std::string, std::string> vars = {{"layer", "0"},
                                                   {"datasource", "prometheus"},
                                                   {"__rate_interval", kRateWindow},
                                                   {"__interval", "1s"},
                                                   {"__range", "1m"}};
  return PanelQueries(*dashboard, vars);
}

class PrometheusE2eTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = (fs::path(::testing::TempDir()) / absl::StrCat("prometheus_e2e_", ::getpid())).string();
    fs::remove_all(dir_);
    fs::create_directories(dir_);
    auto model = GenerateAndOpen((fs::path(dir_) / "model").string(),
                                 SmallModelOptions(ModelFamily::kMixtral));
    ASSERT_TRUE(model.ok()) << model.status();
    model_ = *std::move(model);

    LocalMeshOptions o;
    o.moemesh_binary = MOEMESH_BINARY;
    o.model_dir = model_.dir;
    o.num_expert_services = 2;
    o.work_dir = dir_;
    o.metrics = true;
    // A short load window, so that the imbalance gauge follows the phases below.
    o.router_flags = {"--load-window-s", "6"};
    auto mesh = LocalMesh::Start(o);
    ASSERT_TRUE(mesh.ok()) << mesh.status();
    mesh_ = *std::move(mesh);
    ASSERT_TRUE(mesh_->WaitReady(seconds(60)).ok());

    std::vector<std::string> experts;
    for (const auto& url : mesh_->expert_metrics_urls()) experts.push_back(MetricsTarget(url));
    const absl::Status started =
        StartPrometheus(dir_,
                        {{"moemesh-router", {MetricsTarget(mesh_->router_metrics_url())}},
                         {"moemesh-expert", experts}},
                        &prometheus_process_, &prometheus_);
    ASSERT_TRUE(started.ok()) << started;
  }

  void TearDown() override {
    prometheus_process_.reset();
    mesh_.reset();
    std::error_code ignored;
    fs::remove_all(dir_, ignored);
  }

  // T tokens for `layer`: random, or (skewed) built so that the gate scores `hot`
  // far above every other expert: x = noise + 6·w_hot/|w_hot| moves the hot logit ~6
  // standard deviations up and the others ~6·cos(w_hot, w_e) ≈ 0.75 (random directions
  // in 64 dimensions), so the second choice still varies.
  Tensor Input(int64_t layer, int64_t T, bool skewed, std::mt19937& rng) {
    const int64_t H = model_.config.hidden_size;
    Tensor x = Tensor::Empty(DType::kF32, {T, H});
    std::normal_distribution<float> nd;
    float* d = x.mutable_data<float>();
    for (int64_t i = 0; i < T * H; ++i) d[i] = nd(rng);
    if (skewed) {
      auto gate = MoeGate::Create(*model_.ckpt, model_.config, layer).value();
      const float* w = gate->weights().weight.data<float>() + kHot.at(layer) * H;
      double norm = 0;
      for (int64_t h = 0; h < H; ++h) norm += double(w[h]) * w[h];
      const float scale = static_cast<float>(6.0 / std::sqrt(norm));
      for (int64_t t = 0; t < T; ++t) {
        for (int64_t h = 0; h < H; ++h) d[t * H + h] += scale * w[h];
      }
    }
    return x;
  }

  // Calls both layers for `duration`; with `bad`, also calls an unknown layer.
  void Drive(bool skewed, seconds duration, bool bad) {
    KServeClient client(mesh_->router_endpoint());
    std::mt19937 rng(skewed ? 2 : 1);
    const auto end = std::chrono::steady_clock::now() + duration;
    while (std::chrono::steady_clock::now() < end) {
      for (const auto& [layer, hot] : kHot) {
        auto r = client.Infer(Input(layer, 16, skewed, rng), layer, seconds(30), false);
        ASSERT_TRUE(r.ok()) << r.status();
      }
      if (bad) {
        auto r = client.Infer(Input(0, 4, false, rng), 99, seconds(30), false);
        ASSERT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
      }
      std::this_thread::sleep_for(milliseconds(20));
    }
  }

  std::string dir_;
  GeneratedModel model_;
  std::unique_ptr<LocalMesh> mesh_;
  std::unique_ptr<ChildProcess> prometheus_process_;
  std::unique_ptr<Prometheus> prometheus_;
};

TEST_F(PrometheusE2eTest, HotExpertsImbalanceAndDashboardQueries) {
  const Prometheus& prom = *prometheus_;
  // Every target scraped and up.
  ASSERT_TRUE(prom.WaitFor(
      "count(up{job=~\"moemesh-.*\"} == 1)", [](const Series& s) { return s.value == 3; },
      seconds(30)))
      << "router and both expert services are not all up in Prometheus";

  // Phase 1, balanced load: the imbalance gauge stays near 1.
  Drive(/*skewed=*/false, seconds(7), /*bad=*/false);
  ASSERT_TRUE(prom.WaitFor(
      "moemesh_router_expert_imbalance{layer=\"0\"}", [](const Series& s) { return s.value > 0; },
      seconds(10)));
  const double balanced_time = NowSeconds();
  const double balanced = prom.Value("moemesh_router_expert_imbalance{layer=\"0\"}", balanced_time);
  EXPECT_GT(balanced, 0.99);
  EXPECT_LT(balanced, 2.0) << "random inputs should spread over the 8 experts";

  // Phase 2, skewed: every token of layer 0 picks expert 3, of layer 1 expert 6.
  Drive(/*skewed=*/true, seconds(9), /*bad=*/true);
  // Scraped and evaluated once the window is skewed through (no fixed wait).
  for (const auto& [layer, hot] : kHot) {
    ASSERT_TRUE(prom.WaitFor(
        absl::StrCat("moemesh_router_expert_imbalance{layer=\"", layer, "\"}"),
        [](const Series& s) { return s.value > 3.0; }, seconds(15)))
        << "layer " << layer;
  }

  for (const auto& [layer, hot] : kHot) {
    SCOPED_TRACE(absl::StrCat("layer ", layer));
    // The gauge moved: top-2 of 8 with one expert in every token's choice gives
    // max/mean = 1 / (2/8) = 4 over a window of skewed calls only.
    const double skewed =
        prom.Value(absl::StrCat("moemesh_router_expert_imbalance{layer=\"", layer, "\"}"));
    EXPECT_GT(skewed, 3.0);
    if (layer == 0) {
      EXPECT_GT(skewed, balanced + 1.5);
    }
    EXPECT_GT(prom.Value(absl::StrCat("moemesh_router_balance_statistic{layer=\"", layer, "\"}")),
              1.5);

    // The hottest expert by routed-token rate is the one the inputs were built for.
    auto top = prom.Query(absl::StrCat("topk(1, rate(moemesh_router_expert_tokens_total{layer=\"",
                                       layer, "\"}[", kRateWindow, "]))"));
    ASSERT_TRUE(top.ok()) << top.status();
    ASSERT_EQ(top->size(), 1u);
    EXPECT_EQ(top->front().labels["expert"], absl::StrCat(hot));
    // At ≥ 3× the layer's mean rate.
    const double ratio = prom.Value(
        absl::StrCat("max(rate(moemesh_router_expert_tokens_total{layer=\"", layer, "\"}[",
                     kRateWindow, "])) / avg(rate(moemesh_router_expert_tokens_total{layer=\"",
                     layer, "\"}[", kRateWindow, "]))"));
    EXPECT_GT(ratio, 3.0);

    // The shipped recording rule sees it too (its 1 m window also holds the balanced
    // phase, where the expert had its fair share: ratio 1).
    EXPECT_GT(prom.Value(absl::StrCat("moemesh:expert_load_ratio{layer=\"", layer, "\",expert=\"",
                                      hot, "\"}")),
              1.5);

    // The expert service that holds it computed its rows: its per-expert counter leads.
    auto served =
        prom.Query(absl::StrCat("topk(1, moemesh_expert_tokens_total{layer=\"", layer, "\"})"));
    ASSERT_TRUE(served.ok()) << served.status();
    ASSERT_EQ(served->size(), 1u);
    EXPECT_EQ(served->front().labels["expert"], absl::StrCat(hot));
    EXPECT_EQ(served->front().labels["job"], "moemesh-expert");
  }

  // Bad calls are counted by code; good ones too.
  EXPECT_GT(prom.Value("sum(moemesh_router_requests_total{code=\"INVALID_ARGUMENT\"})"), 0);
  EXPECT_GT(prom.Value("sum(moemesh_router_requests_total{code=\"OK\"})"), 20);
  // A dispatch latency histogram per expert service.
  auto destinations =
      prom.Query("count by (destination) (moemesh_router_dispatch_latency_seconds_count)");
  ASSERT_TRUE(destinations.ok());
  EXPECT_EQ(destinations->size(), 2u);
  EXPECT_EQ(prom.Value("max(moemesh_router_placement_epoch)"), 1);

  // The shipped rules load and evaluate without errors.
  auto rules = HttpGet(absl::StrCat(prom.base(), "/api/v1/rules"));
  ASSERT_TRUE(rules.ok());
  const auto groups = nlohmann::json::parse(rules->body)["data"]["groups"];
  int num_rules = 0;
  for (const auto& g : groups) {
    for (const auto& r : g["rules"]) {
      ++num_rules;
      EXPECT_EQ(r.value("health", ""), "ok")
          << r.value("name", "") << ": " << r.value("lastError", "");
    }
  }
  EXPECT_GT(num_rules, 4);

  // Every query of the shipped dashboard, variables substituted, returns data; the GPU
  // panels' (moemesh_expert_gpu_*, only with --device cuda) evaluate without error but
  // have none on this CPU mesh (gpu_experts_test checks those series on a GPU).
  const std::vector<PanelQuery> queries = DashboardQueries();
  EXPECT_GE(queries.size(), 8u);
  for (const PanelQuery& q : queries) {
    auto r = prom.Query(q.expr);
    ASSERT_TRUE(r.ok()) << "panel '" << q.panel_title << "': " << r.status();
    if (absl::StrContains(q.expr, "moemesh_expert_gpu_")) continue;
    // This mesh has a fixed placement; ControllerPrometheusTest checks the controller's.
    if (absl::StrContains(q.expr, "moemesh_controller_")) continue;
    EXPECT_FALSE(r->empty()) << "panel '" << q.panel_title << "' query " << q.ref_id
                             << " returned no data: " << q.expr;
  }

  // An expert service dies: Prometheus sees it down, the router counts UNAVAILABLE
  // dispatches to it, and both alerts on it go pending (they fire after their `for`).
  const std::string dead = mesh_->expert_endpoints()[1];
  mesh_->expert_process(1).Signal(SIGKILL, /*wait=*/true);
  {
    KServeClient client(mesh_->router_endpoint());
    std::mt19937 rng(5);
    int unavailable = 0;
    for (int i = 0; i < 10; ++i) {
      auto r = client.Infer(Input(0, 64, false, rng), 0, seconds(30), false);
      unavailable += r.status().code() == absl::StatusCode::kUnavailable;
    }
    EXPECT_EQ(unavailable, 10) << "64 random tokens reach every expert, half of them on " << dead;
  }
  EXPECT_TRUE(prom.WaitFor(
      absl::StrCat("up{job=\"moemesh-expert\",instance=\"",
                   MetricsTarget(mesh_->expert_metrics_urls()[1]), "\"}"),
      [](const Series& s) { return s.value == 0; }, seconds(15)));
  EXPECT_TRUE(prom.WaitFor(
      absl::StrCat("moemesh_router_dispatch_failures_total{code=\"UNAVAILABLE\",destination=\"",
                   dead, "\"}"),
      [](const Series& s) { return s.value >= 10; }, seconds(15)));
  EXPECT_TRUE(prom.WaitFor(
      "moemesh_router_requests_total{code=\"UNAVAILABLE\"}",
      [](const Series& s) { return s.value >= 10; }, seconds(15)));
  for (const std::string alert : {"MoeMeshExpertServiceDown", "MoeMeshExpertUnreachable"}) {
    EXPECT_TRUE(prom.WaitFor(
        absl::StrCat("ALERTS{alertname=\"", alert, "\"}"),
        [](const Series& s) { return s.labels.count("alertstate") > 0; }, seconds(20)))
        << alert << " did not go pending";
  }
}

// The placement controller through Prometheus: a skewed load rebalanced by one round
// shows in the controller's metrics (moves, bytes, epoch, each router's acknowledgement,
// every layer's balance before and after the plan), and every query of the dashboard's
// rebalancing row returns data.
TEST(ControllerPrometheusTest, ARebalancingRoundShowsInPrometheusAndTheDashboard) {
  const std::string dir =
      (fs::path(::testing::TempDir()) / absl::StrCat("prometheus_controller_", ::getpid()))
          .string();
  fs::remove_all(dir);
  fs::create_directories(dir);
  auto model =
      GenerateAndOpen((fs::path(dir) / "model").string(), SmallModelOptions(ModelFamily::kMixtral));
  ASSERT_TRUE(model.ok()) << model.status();
  ControlledMeshOptions o;
  o.moemesh_binary = MOEMESH_BINARY;
  o.model_dir = model->dir;
  o.num_expert_services = 3;
  o.num_routers = 1;
  o.metrics = true;
  o.load_window_s = 3;
  o.load_report_s = 0.3;
  o.rebalance_interval_s = 0;
  auto mesh = ControlledMesh::Start(o);
  ASSERT_TRUE(mesh.ok()) << mesh.status();
  std::vector<std::string> experts;
  for (int i = 0; i < 3; ++i) experts.push_back(MetricsTarget((*mesh)->expert_metrics_url(i)));
  std::unique_ptr<ChildProcess> process;
  std::unique_ptr<Prometheus> prometheus;
  const absl::Status started =
      StartPrometheus(dir,
                      {{"moemesh-router", {MetricsTarget((*mesh)->router_metrics_urls()[0])}},
                       {"moemesh-expert", experts},
                       {"moemesh-controller", {MetricsTarget((*mesh)->controller_metrics_url())}}},
                      &process, &prometheus);
  ASSERT_TRUE(started.ok()) << started;
  const Prometheus& prom = *prometheus;
  ASSERT_TRUE(prom.WaitFor(
      "count(up{job=~\"moemesh-.*\"} == 1)", [](const Series& s) { return s.value == 5; },
      seconds(30)))
      << "the controller, the router and the 3 expert services are not all up";

  const TokenSkew hot = TokenSkew::Hot(*model->ckpt, model->config, {3}, 0.8).value();
  LoadDriverOptions lo;
  lo.routers = (*mesh)->router_endpoints();
  auto driver = LoadDriver::Start(lo, *model->ckpt, model->config, &hot);
  ASSERT_TRUE(driver.ok()) << driver.status();
  std::this_thread::sleep_for(seconds(4));  // the router's 3 s window fills with skew
  const v1::ControllerState before = (*mesh)->State().value();
  const absl::StatusOr<v1::RebalanceResponse> r = (*mesh)->Rebalance();
  ASSERT_TRUE(r.ok()) << r.status();
  ASSERT_GT(r->added(), 0) << r->note();
  const v1::ControllerState after = (*mesh)->State().value();
  const uint64_t epoch = r->epoch();

  // Scraped once the round is over (no fixed wait).
  ASSERT_TRUE(prom.WaitFor(
      "moemesh_controller_moves_total",
      [&](const Series& s) { return s.value == static_cast<double>(after.moves()); }, seconds(15)))
      << "moves_total never reached the controller's " << after.moves();
  EXPECT_EQ(after.moves() - before.moves(), r->added());
  EXPECT_EQ(prom.Value("moemesh_controller_bytes_moved_total"),
            static_cast<double>(after.bytes_moved()));
  EXPECT_GT(after.bytes_moved(), before.bytes_moved());
  EXPECT_EQ(prom.Value("moemesh_controller_epoch"), static_cast<double>(epoch));
  EXPECT_EQ(prom.Value("moemesh_controller_router_acked_epoch{router=\"router-0\"}"),
            static_cast<double>(epoch));
  // Each target is scraped on its own clock: the router's sample may lag the controller's.
  EXPECT_TRUE(prom.WaitFor(
      "moemesh_router_placement_epoch",
      [&](const Series& s) { return s.value == static_cast<double>(epoch); }, seconds(5)));
  EXPECT_EQ(prom.Value("moemesh_controller_routers"), 1);
  EXPECT_EQ(prom.Value("moemesh_controller_services{state=\"ready\"}"), 3);
  EXPECT_EQ(prom.Value("moemesh_controller_experts_below_target"), 0);
  EXPECT_EQ(prom.Value("moemesh_controller_move_in_progress_seconds"), 0);
  EXPECT_EQ(prom.Value("sum(moemesh_controller_aborted_moves_total)"), 0);
  EXPECT_GE(prom.Value("moemesh_controller_planning_seconds_count"), 2);  // start, this round
  EXPECT_GE(prom.Value("moemesh_controller_move_seconds_count"), 2);
  // The plan evened the hot layer out: its balance after is above before and above 0.8.
  for (const char* layer : {"0", "1"}) {
    SCOPED_TRACE(absl::StrCat("layer ", layer));
    const double b = prom.Value(
        absl::StrCat("moemesh_controller_layer_balance{layer=\"", layer, "\",when=\"before\"}"));
    const double a = prom.Value(
        absl::StrCat("moemesh_controller_layer_balance{layer=\"", layer, "\",when=\"after\"}"));
    EXPECT_LT(b, 0.8);
    EXPECT_GT(a, 0.8);
  }

  // Every query of the rebalancing row returns data.
  int controller_queries = 0;
  for (const PanelQuery& q : DashboardQueries()) {
    if (!absl::StrContains(q.expr, "moemesh_controller_")) continue;
    ++controller_queries;
    auto got = prom.Query(q.expr);
    ASSERT_TRUE(got.ok()) << "panel '" << q.panel_title << "': " << got.status();
    EXPECT_FALSE(got->empty()) << "panel '" << q.panel_title << "' query " << q.ref_id
                               << " returned no data: " << q.expr;
  }
  EXPECT_GE(controller_queries, 10);

  (*driver)->Stop();
  const LoadDriver::Totals t = (*driver)->totals();
  EXPECT_EQ(t.failed, 0) << t.first_error;
  EXPECT_EQ(t.mismatched, 0);
  process.reset();
  mesh->reset();
  std::error_code ignored;
  fs::remove_all(dir, ignored);
}

}  // namespace
}  // namespace moemesh
