// Network faults, for real (issue 19, item 4): expert service A runs in a network
// namespace of its own behind a veth pair (tools/netns.h), expert service B and the router
// on this side; both services hold every expert (--replicas 2). The link to A is then
// blackholed (packets dropped, no reset), refused (A's ports answer with resets), reset
// (every segment to A answered with a reset) or throttled (tc), and the router's callers
// must see: answers bit-identical to the in-process MoeLayer from the other replica, or
// DEADLINE_EXCEEDED by their deadline — never a hang; the blackholed destination ejected;
// hedges winning over the throttled link; A taking traffic again once the fault is
// lifted. ctest runs it over gRPC (network_faults_test) and over UCX on TCP
// (network_faults_ucx_test: MOEMESH_TEST_TRANSPORT=ucx, UCX_TLS=tcp). Needs root (skips
// without it, or without `ip netns`); all traffic stays on loopback and the addresses of
// the namespaces it makes.
#include <gtest/gtest.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <functional>
#include <iostream>
#include <map>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "services/base/status_macros.h"
#include "services/model/model_generator.h"
#include "services/moe/moe_layer.h"
#include "tools/http_client.h"
#include "tools/local_mesh.h"
#include "tools/netns.h"
#include "tools/process.h"

#ifndef MOEMESH_BINARY
#error "MOEMESH_BINARY must name the moemesh executable"
#endif

namespace moemesh {
namespace {

using std::chrono::milliseconds;
using std::chrono::seconds;
using Clock = std::chrono::steady_clock;

// What this noisy 2-core VM may add to a deadline before a caller sees the call end.
constexpr milliseconds kSlack{1500};

std::string Transport() {
  const char* t = std::getenv("MOEMESH_TEST_TRANSPORT");
  return t != nullptr ? t : "grpc";
}

// The small Mixtral, generated once per process, removed at exit.
const GeneratedModel& Model() {
  static const GeneratedModel* model = [] {
    const std::string dir =
        (std::filesystem::path(::testing::TempDir()) / absl::StrCat("netfault_model_", ::getpid()))
            .string();
    static const int registered = std::atexit([] {
      std::error_code ec;
      std::filesystem::remove_all(
          std::filesystem::path(::testing::TempDir()) / absl::StrCat("netfault_model_", ::getpid()),
          ec);
    });
    (void)registered;
    return new GeneratedModel(
        GenerateAndOpen(dir, SmallModelOptions(ModelFamily::kMixtral)).value());
  }();
  return *model;
}

// The Prometheus text exposition, summed over the series of `name` whose labels include
// every pair of `labels` (0 when none).
double Sum(const std::string& text, const std::string& name,
           const std::map<std::string, std::string>& labels = {}) {
  double sum = 0;
  for (absl::string_view line : absl::StrSplit(text, '\n', absl::SkipEmpty())) {
    if (line[0] == '#') continue;
    const size_t end = line.find_first_of("{ ");
    if (end == absl::string_view::npos || line.substr(0, end) != name) continue;
    std::map<std::string, std::string> have;
    size_t value_at = end;
    if (line[end] == '{') {
      const size_t close = line.find('}', end);
      if (close == absl::string_view::npos) continue;
      for (absl::string_view pair :
           absl::StrSplit(line.substr(end + 1, close - end - 1), ',', absl::SkipEmpty())) {
        const size_t eq = pair.find('=');
        if (eq == absl::string_view::npos || pair.size() < eq + 3) continue;
        have[std::string(pair.substr(0, eq))] =
            std::string(pair.substr(eq + 2, pair.size() - eq - 3));  // unquoted
      }
      value_at = close + 1;
    }
    bool match = true;
    for (const auto& [k, v] : labels) {
      auto it = have.find(k);
      match = match && it != have.end() && it->second == v;
    }
    if (match) sum += std::strtod(std::string(line.substr(value_at + 1)).c_str(), nullptr);
  }
  return sum;
}

// The two expert services, the router, and A's namespace.
struct Mesh {
  std::unique_ptr<NetNamespace> ns;
  std::unique_ptr<ChildProcess> a, b, router;
  std::string a_endpoint, b_endpoint, router_endpoint, metrics_url;

  std::string Metrics() const {
    auto reply = HttpGet(metrics_url, seconds(10));
    EXPECT_TRUE(reply.ok()) << reply.status();
    return reply.ok() ? reply->body : "";
  }
  // Calls to A, and those of them that failed, as the router counts them.
  double CallsTo(const std::string& text, const std::string& endpoint) const {
    return Sum(text, "moemesh_router_dispatch_latency_seconds_count", {{"destination", endpoint}});
  }
  double FailuresTo(const std::string& text, const std::string& endpoint,
                    const std::string& code = "") const {
    std::map<std::string, std::string> labels = {{"destination", endpoint}};
    if (!code.empty()) labels["code"] = code;
    return Sum(text, "moemesh_router_dispatch_failures_total", labels);
  }
  double AnsweredBy(const std::string& text, const std::string& endpoint) const {
    return CallsTo(text, endpoint) - FailuresTo(text, endpoint);
  }
  double Ejected(const std::string& text, const std::string& endpoint) const {
    return Sum(text, "moemesh_router_destination_ejected", {{"destination", endpoint}});
  }
};

absl::StatusOr<Mesh> StartMesh(const std::vector<std::string>& router_flags) {
  Mesh m;
  ASSIGN_OR_RETURN(m.ns, NetNamespace::Create());
  const std::string transport = Transport();
  auto expert = [&](const std::string& id, const std::string& listen) {
    return std::vector<std::string>{MOEMESH_BINARY, "expert", "--model",      Model().dir,
                                    "--listen",     listen,   "--service-id", id,
                                    "--experts",    "all",    "--threads",    "1",
                                    "--transport",  transport};
  };
  // Over UCX each process uses only the devices it needs (UCX_NET_DEVICES, through env,
  // which execs): A its end of the veth, B loopback, the router both. Not eth0 nor the
  // veths of other namespaces (a suite running alongside), which come and go.
  auto devices = [&](const std::string& list, std::vector<std::string> argv) {
    if (transport != "ucx") return argv;
    argv.insert(argv.begin(), {"/usr/bin/env", "UCX_NET_DEVICES=" + list});
    return argv;
  };
  // A inside the namespace, on its address there; B here.
  ASSIGN_OR_RETURN(m.a, ChildProcess::Start(m.ns->Exec(
                            devices(m.ns->ns_device(), expert("a", m.ns->ns_address() + ":0")))));
  ASSIGN_OR_RETURN(m.b, ChildProcess::Start(devices("lo", expert("b", "127.0.0.1:0"))));
  ASSIGN_OR_RETURN(m.a_endpoint, m.a->WaitListening(seconds(60)));
  ASSIGN_OR_RETURN(m.b_endpoint, m.b->WaitListening(seconds(60)));
  std::vector<std::string> router = {MOEMESH_BINARY,     "router",
                                     "--model",          Model().dir,
                                     "--endpoints",      m.a_endpoint + "," + m.b_endpoint,
                                     "--replicas",       "2",
                                     "--listen",         "127.0.0.1:0",
                                     "--metrics-listen", "127.0.0.1:0",
                                     "--transport",      transport};
  router.insert(router.end(), router_flags.begin(), router_flags.end());
  ASSIGN_OR_RETURN(m.router,
                   ChildProcess::Start(devices("lo," + m.ns->host_device(), std::move(router))));
  ASSIGN_OR_RETURN(m.metrics_url, m.router->WaitForLine("metrics on ", seconds(60)));
  ASSIGN_OR_RETURN(m.router_endpoint, m.router->WaitListening(seconds(60)));
  KServeClient client(m.router_endpoint);
  const auto end = Clock::now() + seconds(60);
  while (true) {
    auto ready = client.ServerReady();
    if (ready.ok() && *ready) break;
    if (Clock::now() > end) return absl::DeadlineExceededError("the router did not get ready");
    std::this_thread::sleep_for(milliseconds(100));
  }
  return m;
}

// Inputs for MoE layer 0 and the in-process layer's answers to them.
struct Inputs {
  std::vector<Tensor> x;
  std::vector<Tensor> want;
};

const Inputs& TestInputs(int64_t tokens) {
  static std::map<int64_t, Inputs>* all = new std::map<int64_t, Inputs>;
  Inputs& in = (*all)[tokens];
  if (!in.x.empty()) return in;
  const GeneratedModel& m = Model();
  auto layer = MoeLayer::Create(*m.ckpt, m.config, m.config.MoeLayers()[0]).value();
  std::mt19937 rng(static_cast<uint32_t>(tokens));
  std::normal_distribution<float> nd;
  for (int i = 0; i < 4; ++i) {
    Tensor x = Tensor::Empty(DType::kF32, {tokens, m.config.hidden_size});
    for (int64_t j = 0; j < x.numel(); ++j) x.mutable_data<float>()[j] = nd(rng);
    in.want.push_back(layer->Forward(x).value().output);
    in.x.push_back(std::move(x));
  }
  return in;
}

struct Outcome {
  absl::Status status;
  milliseconds elapsed{0};
};

// One ModelInfer with the caller's `deadline`; an answer must be MoeLayer's, bit for bit.
Outcome Call(KServeClient& client, int i, milliseconds deadline, int64_t tokens = 32) {
  const Inputs& in = TestInputs(tokens);
  const size_t k = static_cast<size_t>(i) % in.x.size();
  const auto start = Clock::now();
  auto got = client.Infer(in.x[k], Model().config.MoeLayers()[0], deadline, false);
  Outcome o{got.status(), std::chrono::duration_cast<milliseconds>(Clock::now() - start)};
  if (got.ok() && (got->output.shape() != in.want[k].shape() ||
                   std::memcmp(got->output.raw(), in.want[k].raw(), in.want[k].nbytes()) != 0)) {
    o.status = absl::DataLossError("the answer differs from MoeLayer's");
  }
  return o;
}

// The router has no ModelInfer in flight within a second of its caller's call ending: it
// ended the call itself, by the same deadline, rather than leaving it hanging there.
bool RouterIdle(const Mesh& m) {
  const auto end = Clock::now() + seconds(1);
  do {
    const std::string text = m.Metrics();
    if (!text.empty() && Sum(text, "moemesh_router_inflight_requests") == 0) return true;
    std::this_thread::sleep_for(milliseconds(50));
  } while (Clock::now() < end);
  return false;
}

// Lifts the fault; A must answer calls again (the router's count of A's answers grows)
// and every call then succeed, within 60 s (a blackholed TCP connection resumes at its
// next retransmission, seconds later; an ejected destination waits out its ejection).
void ExpectRecovers(Mesh& m, KServeClient& client) {
  ASSERT_TRUE(m.ns->Clear().ok());
  const double answered_before = m.AnsweredBy(m.Metrics(), m.a_endpoint);
  const auto end = Clock::now() + seconds(60);
  int consecutive_ok = 0, i = 0;
  double answered = answered_before;
  while (Clock::now() < end && (answered <= answered_before || consecutive_ok < 8)) {
    const Outcome o = Call(client, i++, seconds(5));
    // Still no hang, nor any other error, on the way back.
    EXPECT_TRUE(o.status.ok() || o.status.code() == absl::StatusCode::kDeadlineExceeded)
        << o.status;
    EXPECT_LE(o.elapsed, seconds(5) + kSlack);
    consecutive_ok = o.status.ok() ? consecutive_ok + 1 : 0;
    const std::string text = m.Metrics();
    answered = m.AnsweredBy(text, m.a_endpoint);
    if (!o.status.ok()) {
      std::cout << "[ netfault ] " << Transport() << ": recovering, call " << i - 1 << ": "
                << o.status << " in " << o.elapsed.count() << " ms; failed calls to A "
                << m.FailuresTo(text, m.a_endpoint) << ", to B " << m.FailuresTo(text, m.b_endpoint)
                << "\n";
    }
    std::this_thread::sleep_for(milliseconds(o.status.ok() ? 20 : 200));
  }
  std::cout << "[ netfault ] " << Transport() << ": recovered in "
            << std::chrono::duration_cast<milliseconds>(Clock::now() - (end - seconds(60))).count()
            << " ms: " << i << " calls, A answered " << answered - answered_before << " more\n";
  EXPECT_GT(answered, answered_before) << "A took no traffic within 60 s of the fault lifted";
  EXPECT_GE(consecutive_ok, 8) << "calls still failing 60 s after the fault was lifted";
  EXPECT_EQ(m.Ejected(m.Metrics(), m.a_endpoint), 0) << "A still ejected";
}

class NetworkFaultsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const absl::Status available = RootAndNetnsAvailable();
    if (!available.ok()) {
      GTEST_SKIP() << "network fault tests need root and `ip netns`: " << available;
    }
  }

  void TearDown() override {
    // Faults off first: a blackholed service would drain slowly.
    if (mesh_ != nullptr) {
      EXPECT_TRUE(mesh_->ns->Clear().ok());
    }
    client_.reset();
    mesh_.reset();
  }

  // Starts the mesh and checks that both services answer before any fault.
  void Start(const std::vector<std::string>& router_flags) {
    auto m = StartMesh(router_flags);
    ASSERT_TRUE(m.ok()) << m.status();
    mesh_ = std::make_unique<Mesh>(*std::move(m));
    client_ = std::make_unique<KServeClient>(mesh_->router_endpoint);
    for (int i = 0; i < 6; ++i) {
      const Outcome o = Call(*client_, i, seconds(10));
      ASSERT_TRUE(o.status.ok()) << o.status;
    }
    const std::string text = mesh_->Metrics();
    ASSERT_GT(mesh_->AnsweredBy(text, mesh_->a_endpoint), 0)
        << "A took no traffic before the fault";
    ASSERT_GT(mesh_->AnsweredBy(text, mesh_->b_endpoint), 0)
        << "B took no traffic before the fault";
  }

  // Calls while A is blackholed, alternately with a caller's deadline of 1.5 s and of 20 s
  // (the router's --timeout-ms, 3 s, then bounds it): each ends in time with an answer or
  // DEADLINE_EXCEEDED, and the router has ended it too. Stops after `calls`, or once
  // `until` holds. Returns the calls that failed.
  int CallsUnderBlackhole(int calls, const std::function<bool()>& until = nullptr) {
    int failed = 0;
    for (int i = 0; i < calls && !(until && until()); ++i) {
      const milliseconds deadline = i % 2 == 0 ? milliseconds(1500) : milliseconds(20000);
      const Outcome o = Call(*client_, i, deadline);
      EXPECT_TRUE(o.status.ok() || o.status.code() == absl::StatusCode::kDeadlineExceeded)
          << "call " << i << ": " << o.status;
      EXPECT_LE(o.elapsed, std::min(deadline, kRouterTimeout) + kSlack) << "call " << i;
      std::cout << "[ netfault ] " << Transport() << ": call " << i << " (deadline "
                << deadline.count() << " ms): " << absl::StatusCodeToString(o.status.code())
                << " in " << o.elapsed.count() << " ms\n";
      if (!o.status.ok()) {
        ++failed;
        EXPECT_TRUE(RouterIdle(*mesh_)) << "call " << i << ": the router did not end it";
      }
    }
    return failed;
  }

  void ExpectFailoverFromResets(absl::Status (NetNamespace::*fault)());

  static constexpr milliseconds kRouterTimeout{3000};
  std::unique_ptr<Mesh> mesh_;
  std::unique_ptr<KServeClient> client_;
};

// A blackholed replica: with no ejection nor hedging, calls to A hang until the deadline
// (nothing ever comes back to end them sooner). Each call must still end by the caller's
// deadline, or the router's own --timeout-ms under a longer one, with an answer from B or
// DEADLINE_EXCEEDED, and the router must have ended it (no call left in flight there).
TEST_F(NetworkFaultsTest, BlackholeEndsEveryCallByItsDeadline) {
  Start({"--timeout-ms", absl::StrCat(kRouterTimeout.count()), "--eject-after", "0",
         "--hedge-after-ms", "0"});
  const double failed_before = mesh_->FailuresTo(mesh_->Metrics(), mesh_->a_endpoint);
  ASSERT_TRUE(mesh_->ns->Blackhole().ok());
  CallsUnderBlackhole(6);
  // The fault was real: calls to A failed (DEADLINE_EXCEEDED; over UCX perhaps UNAVAILABLE
  // from its control-plane probe, the call then answered by B).
  EXPECT_GT(mesh_->FailuresTo(mesh_->Metrics(), mesh_->a_endpoint), failed_before);
  ExpectRecovers(*mesh_, *client_);
}

// The same with ejection: after --eject-after consecutive failures A is ejected, and
// calls succeed again while the blackhole stays; B is never ejected; after the fault is
// lifted A is back once its ejection ends.
TEST_F(NetworkFaultsTest, BlackholeEjectsTheDestination) {
  Start({"--timeout-ms", absl::StrCat(kRouterTimeout.count()), "--eject-after", "2",
         "--eject-base-ms", "6000", "--eject-max-ms", "20000", "--eject-max-share", "0.5"});
  ASSERT_TRUE(mesh_->ns->Blackhole().ok());
  const int failed = CallsUnderBlackhole(
      12, [&] { return mesh_->Ejected(mesh_->Metrics(), mesh_->a_endpoint) == 1; });
  std::string text = mesh_->Metrics();
  ASSERT_EQ(mesh_->Ejected(text, mesh_->a_endpoint), 1) << "A not ejected after 12 calls";
  EXPECT_GE(Sum(text, "moemesh_router_ejections_total", {{"destination", mesh_->a_endpoint}}), 1);
  // Each of these calls goes to A, its failure there failing it: about --eject-after (2)
  // calls fail before the ejection; twice that, loosely.
  EXPECT_LE(failed, 4);
  // Ejected: every call is answered (by B), fast, while the fault stays.
  for (int i = 0; i < 10; ++i) {
    const Outcome o = Call(*client_, i, seconds(2));
    EXPECT_TRUE(o.status.ok()) << "call " << i << " with A ejected: " << o.status;
  }
  text = mesh_->Metrics();
  EXPECT_EQ(mesh_->Ejected(text, mesh_->a_endpoint), 1);
  EXPECT_EQ(mesh_->Ejected(text, mesh_->b_endpoint), 0);
  EXPECT_EQ(Sum(text, "moemesh_router_ejections_total", {{"destination", mesh_->b_endpoint}}), 0);
  ExpectRecovers(*mesh_, *client_);
}

// Resets instead of answers: the router retries UNAVAILABLE on the other replica, so no
// call fails; A was tried and refused (the fault was real); A is back once it is lifted.
void NetworkFaultsTest::ExpectFailoverFromResets(absl::Status (NetNamespace::*fault)()) {
  Start({"--timeout-ms", "5000"});
  const double unavailable_before =
      mesh_->FailuresTo(mesh_->Metrics(), mesh_->a_endpoint, "UNAVAILABLE");
  ASSERT_TRUE((mesh_->ns.get()->*fault)().ok());
  for (int i = 0; i < 12; ++i) {
    const Outcome o = Call(*client_, i, seconds(5));
    EXPECT_TRUE(o.status.ok()) << "call " << i << " with A resetting: " << o.status;
    EXPECT_LE(o.elapsed, seconds(5) + kSlack);
  }
  EXPECT_GT(mesh_->FailuresTo(mesh_->Metrics(), mesh_->a_endpoint, "UNAVAILABLE"),
            unavailable_before);
  ExpectRecovers(*mesh_, *client_);
}

// Refused connections (A's ports closed): the router's connections to A are reset on
// their next segment and every reconnection refused.
TEST_F(NetworkFaultsTest, RefusedConnectionsFailOver) {
  ExpectFailoverFromResets(&NetNamespace::Refuse);
}

// Every segment to A reset, including those of the connections A made (over UCX, the way
// its replies go back to the router).
TEST_F(NetworkFaultsTest, ResetConnectionsFailOver) {
  ExpectFailoverFromResets(&NetNamespace::ResetAll);
}

// A throttled link to A (128 kbit/s each way: a call of 64 tokens there takes seconds):
// with hedging on, calls unanswered after 150 ms go to B as well and B's answer wins;
// every call ends, answered, by its deadline.
TEST_F(NetworkFaultsTest, ThrottledLinkHedgesWin) {
  Start({"--timeout-ms", "20000", "--hedge-after-ms", "150", "--hedge-budget", "1"});
  ASSERT_TRUE(mesh_->ns->Throttle(128, milliseconds(100)).ok());
  for (int i = 0; i < 8; ++i) {
    const Outcome o = Call(*client_, i, seconds(15), 64);
    EXPECT_TRUE(o.status.ok()) << "call " << i << " over the throttled link: " << o.status;
    EXPECT_LE(o.elapsed, seconds(15) + kSlack);
  }
  const std::string text = mesh_->Metrics();
  const double sent = Sum(text, "moemesh_router_hedges_total", {{"result", "sent"}});
  const double won = Sum(text, "moemesh_router_hedges_total", {{"result", "won"}});
  std::cout << "[ netfault ] " << Transport() << ": hedges sent " << sent << ", won " << won
            << "\n";
  // Hedges were sent (calls to A went unanswered for 150 ms: the fault was real) and won.
  EXPECT_GE(sent, 1);
  EXPECT_GE(won, 1);
  ExpectRecovers(*mesh_, *client_);
}

}  // namespace
}  // namespace moemesh
