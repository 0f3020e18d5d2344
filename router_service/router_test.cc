// MoeRouter against an in-process fake transport: the experts are computed by the same
// kernels in this process, replies arrive from other threads in scrambled order, and
// chosen endpoints can be made to fail.
#include "router_service/router.h"

#include <gtest/gtest.h>

#include <cmath>
#include <condition_variable>
#include <cstring>
#include <filesystem>
#include <functional>
#include <random>
#include <set>
#include <thread>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "grpc_predict_v2.grpc.pb.h"
#include "kernels/cpu/expert_ffn.h"
#include "router_control.grpc.pb.h"
#include "router_service/router_server.h"
#include "services/metrics/testing.h"
#include "services/model/model_generator.h"
#include "services/moe/moe_layer.h"
#include "services/rpc/wire.h"
#include "services/transport/queued_exchange.h"

namespace moemesh {
namespace {

class FakeTransport : public ExpertTransport {
 public:
  FakeTransport(const Checkpoint& ckpt, const MoeModelConfig& config)
      : ckpt_(ckpt), config_(config) {}
  ~FakeTransport() override {
    for (auto& t : threads_) t.join();
  }

  std::unique_ptr<Exchange> NewExchange(Clock::time_point) override {
    return std::make_unique<ResponseExchange>(
        [this](const std::string& endpoint, std::unique_ptr<v1::ComputeRequest> request,
               ResponseExchange::Complete done) {
          Send(endpoint, std::move(request), std::move(done));
        },
        &TakeResponse);
  }

  void Send(const std::string& endpoint, std::unique_ptr<v1::ComputeRequest> request,
            ResponseExchange::Complete done) {
    std::lock_guard<std::mutex> lock(mu_);
    ++calls_[endpoint];
    sent_.push_back({endpoint, request->placement_epoch()});
    sent_cv_.notify_all();
    const bool down = down_.count(endpoint) > 0;
    const bool corrupt = corrupt_.count(endpoint) > 0;
    const int delay_us = static_cast<int>(rng_() % 2000) + slow_us_[endpoint];
    threads_.emplace_back([this, endpoint, down, corrupt, delay_us, done = std::move(done),
                           request = std::shared_ptr<v1::ComputeRequest>(std::move(request))] {
      {
        // Held replies wait until Release: their calls stay outstanding meanwhile.
        std::unique_lock<std::mutex> lock(mu_);
        hold_cv_.wait(lock, [&] { return !hold_; });
      }
      std::this_thread::sleep_for(std::chrono::microseconds(delay_us));  // scramble arrival order
      if (down) {
        done(absl::UnavailableError(absl::StrCat(endpoint, " is down")), nullptr);
        return;
      }
      auto response = std::make_unique<v1::ComputeResponse>();
      const auto out_dtype = FromProtoDType(request->output_dtype()).value();
      for (const auto& batch : request->batches()) {
        const Tensor rows = FromProto(batch.rows(), nullptr, "rows").value().ToF32().value();
        const int64_t n = rows.dim(0), H = config_.hidden_size;
        const ExpertWeights w =
            LoadExpert(ckpt_, config_, request->layer(), batch.expert()).value();
        const ExpertFfnWeights v = w.View(config_);
        std::vector<float> scratch(ExpertFfnScratch(v, n));
        Tensor y = Tensor::Empty(DType::kF32, {corrupt ? n + 1 : n, H});
        ExpertFfn(v, rows.data<float>(), n, scratch.data(), y.mutable_data<float>());
        auto* out = response->add_outputs();
        out->set_expert(batch.expert());
        EXPECT_TRUE(ToProto(y, out_dtype, out->mutable_rows()).ok());
      }
      done(absl::OkStatus(), std::move(response));
    });
  }
  // Every endpoint holds every expert unless SetHeld says otherwise; one SetDown answers
  // nothing.
  absl::Status Info(const std::string& endpoint, const v1::InfoRequest&, Clock::time_point,
                    v1::InfoResponse* info) override {
    std::lock_guard<std::mutex> lock(mu_);
    if (down_.count(endpoint)) return absl::UnavailableError("connection refused");
    for (int64_t layer : config_.MoeLayers()) {
      for (int32_t e = 0; e < config_.num_experts; ++e) {
        auto it = held_.find(endpoint);
        if (it != held_.end() && !it->second.count({layer, e})) continue;
        v1::ExpertId* id = info->add_experts();
        id->set_layer(layer);
        id->set_expert(e);
      }
    }
    return absl::OkStatus();
  }

  // Replies wait from now until Release.
  void Hold() {
    std::lock_guard<std::mutex> l(mu_);
    hold_ = true;
  }
  void Release() {
    {
      std::lock_guard<std::mutex> l(mu_);
      hold_ = false;
    }
    hold_cv_.notify_all();
  }
  // Waits until `n` requests have been sent in all.
  void WaitSent(size_t n) {
    std::unique_lock<std::mutex> l(mu_);
    sent_cv_.wait(l, [&] { return sent_.size() >= n; });
  }
  // (endpoint, placement epoch) of every request, in the order sent.
  std::vector<std::pair<std::string, uint64_t>> Sent() {
    std::lock_guard<std::mutex> l(mu_);
    return sent_;
  }
  void SetHeld(const std::string& endpoint, std::set<std::pair<int64_t, int32_t>> experts) {
    std::lock_guard<std::mutex> l(mu_);
    held_[endpoint] = std::move(experts);
  }

  void SetDown(const std::string& e) {
    std::lock_guard<std::mutex> l(mu_);
    down_.insert(e);
  }
  void SetUp(const std::string& e) {
    std::lock_guard<std::mutex> l(mu_);
    down_.erase(e);
  }
  // Every reply from `e` takes `ms` longer.
  void SetSlow(const std::string& e, int ms) {
    std::lock_guard<std::mutex> l(mu_);
    slow_us_[e] = ms * 1000;
  }
  void SetCorrupt(const std::string& e) {
    std::lock_guard<std::mutex> l(mu_);
    corrupt_.insert(e);
  }
  int Calls(const std::string& e) {
    std::lock_guard<std::mutex> l(mu_);
    return calls_[e];
  }

 private:
  const Checkpoint& ckpt_;
  const MoeModelConfig& config_;
  std::mutex mu_;
  std::mt19937 rng_{3};
  std::set<std::string> down_, corrupt_;
  std::map<std::string, int> calls_;
  std::map<std::string, int> slow_us_;
  bool hold_ = false;
  std::condition_variable hold_cv_, sent_cv_;
  std::vector<std::pair<std::string, uint64_t>> sent_;
  std::map<std::string, std::set<std::pair<int64_t, int32_t>>> held_;
  std::vector<std::thread> threads_;
};

using Fixture = GeneratedModel;

Fixture Make(ModelFamily family) {
  const std::string dir = (std::filesystem::path(::testing::TempDir()) /
                           absl::StrCat("router_test_", FamilyName(family)))
                              .string();
  return GenerateAndOpen(dir, SmallModelOptions(family, /*seed=*/5)).value();
}

Tensor Input(int64_t T, int64_t H) {
  Tensor x = Tensor::Empty(DType::kF32, {T, H});
  std::mt19937 rng(9);
  std::normal_distribution<float> nd;
  for (int64_t i = 0; i < x.numel(); ++i) x.mutable_data<float>()[i] = nd(rng);
  return x;
}

auto Deadline() { return ExpertTransport::Clock::now() + std::chrono::seconds(30); }

// A placement of `epoch` that gives every (MoE layer, expert) the replicas `endpoints`, in
// that order.
v1::Placement Everywhere(const MoeModelConfig& config, uint64_t epoch,
                         const std::vector<std::string>& endpoints) {
  v1::Placement p;
  p.set_epoch(epoch);
  for (int64_t layer : config.MoeLayers()) {
    for (int32_t e = 0; e < config.num_experts; ++e) {
      v1::PlacementEntry* entry = p.add_entries();
      entry->set_layer(layer);
      entry->set_expert(e);
      for (const std::string& endpoint : endpoints) entry->add_replicas(endpoint);
    }
  }
  return p;
}

struct Case {
  ModelFamily family;
  DType wire;
  PlacementPolicy policy;
  int replicas;
};

class RouterTest : public ::testing::TestWithParam<Case> {};

TEST_P(RouterTest, BitIdenticalToMoeLayer) {
  const Case p = GetParam();
  Fixture f = Make(p.family);
  auto transport = std::make_shared<FakeTransport>(*f.ckpt, f.config);
  RouterOptions ro;
  ro.model_dir = f.dir;
  ro.endpoints = {"a:1", "b:2", "c:3"};
  ro.policy = p.policy;
  ro.replicas = p.replicas;
  ro.wire_dtype = p.wire;
  auto router = MoeRouter::Create(ro, transport);
  ASSERT_TRUE(router.ok()) << router.status();
  MoeLayerOptions lo;
  lo.wire_dtype = p.wire;
  for (int64_t layer : f.config.MoeLayers()) {
    auto ref_layer = MoeLayer::Create(*f.ckpt, f.config, layer, lo).value();
    for (int64_t T : {1, 7, 100}) {
      const Tensor x = Input(T, f.config.hidden_size);
      const MoeLayerOutput want = ref_layer->Forward(x).value();
      auto got = (*router)->Forward(layer, x, Deadline());
      ASSERT_TRUE(got.ok()) << got.status();
      ASSERT_EQ(std::memcmp(got->output.raw(), want.output.raw(), want.output.nbytes()), 0)
          << "layer " << layer << " T " << T;
      ASSERT_EQ(std::memcmp(got->topk_ids.raw(), want.topk_ids.raw(), want.topk_ids.nbytes()), 0);
    }
  }
  int64_t routed = 0;
  for (int64_t v : (*router)->ExpertLoad(f.config.MoeLayers().front())) routed += v;
  EXPECT_EQ(routed, (1 + 7 + 100) * f.config.top_k);
}

INSTANTIATE_TEST_SUITE_P(
    Families, RouterTest,
    ::testing::Values(Case{ModelFamily::kMixtral, DType::kF32, PlacementPolicy::kContiguous, 1},
                      Case{ModelFamily::kMixtral, DType::kBF16, PlacementPolicy::kRoundRobin, 2},
                      Case{ModelFamily::kQwen2Moe, DType::kF32, PlacementPolicy::kRoundRobin, 1},
                      Case{ModelFamily::kQwen3Moe, DType::kBF16, PlacementPolicy::kContiguous, 3},
                      Case{ModelFamily::kDeepseekV3, DType::kF32, PlacementPolicy::kContiguous, 2},
                      Case{ModelFamily::kDeepseekV2, DType::kF32, PlacementPolicy::kRoundRobin, 1},
                      Case{ModelFamily::kGptOss, DType::kBF16, PlacementPolicy::kContiguous, 1}));

// Replica choice under concurrency: a call's experts go to the replica with the fewest
// tokens outstanding. The first call finds both idle (a tie: the first replica); the
// second, made while the first's tokens are still out on a:1, goes to b:2; the third, after
// both, to a:1 again.
TEST(RouterTest, FewestOutstandingTokensPicksTheReplicaUnderConcurrency) {
  Fixture f = Make(ModelFamily::kMixtral);
  auto transport = std::make_shared<FakeTransport>(*f.ckpt, f.config);
  RouterOptions ro;
  ro.model_dir = f.dir;
  ro.endpoints = {"a:1"};
  auto router = MoeRouter::Create(ro, transport).value();
  const PlacementTable both =
      PlacementTable::FromProto(Everywhere(f.config, 2, {"a:1", "b:2"}), f.config).value();
  ASSERT_TRUE(router->SetPlacement(both).ok());
  const Tensor x = Input(64, f.config.hidden_size);
  const MoeLayerOutput want = MoeLayer::Create(*f.ckpt, f.config, 0).value()->Forward(x).value();
  transport->Hold();
  absl::StatusOr<MoeLayerOutput> first, second;
  std::thread a([&] { first = router->Forward(0, x, Deadline()); });
  transport->WaitSent(1);
  std::thread b([&] { second = router->Forward(0, x, Deadline()); });
  transport->WaitSent(2);
  transport->Release();
  a.join();
  b.join();
  ASSERT_TRUE(first.ok()) << first.status();
  ASSERT_TRUE(second.ok()) << second.status();
  EXPECT_EQ(std::memcmp(first->output.raw(), want.output.raw(), want.output.nbytes()), 0);
  EXPECT_EQ(std::memcmp(second->output.raw(), want.output.raw(), want.output.nbytes()), 0);
  ASSERT_TRUE(router->Forward(0, x, Deadline()).ok());
  const std::vector<std::pair<std::string, uint64_t>> sent = transport->Sent();
  const std::vector<std::pair<std::string, uint64_t>> expected = {
      {"a:1", 2}, {"b:2", 2}, {"a:1", 2}};
  EXPECT_EQ(sent, expected);
}

// RouterControl.SetPlacement over gRPC while a call is in flight: the new table takes
// over for new calls at once, the call in flight finishes on the table it started with,
// and a placement whose epoch is not newer is refused.
TEST(RouterServerTest, SetPlacementOverGrpcWhileACallIsInFlight) {
  Fixture f = Make(ModelFamily::kQwen3Moe);
  auto transport = std::make_shared<FakeTransport>(*f.ckpt, f.config);
  RouterOptions ro;
  ro.model_dir = f.dir;
  ro.endpoints = {"a:1"};
  auto server = RouterServer::Create({}, MoeRouter::Create(ro, transport).value()).value();
  auto channel = grpc::CreateChannel(absl::StrCat("127.0.0.1:", server->port()),
                                     grpc::InsecureChannelCredentials());
  auto control = v1::RouterControl::NewStub(channel);
  const Tensor x = Input(20, f.config.hidden_size);
  const MoeLayerOutput want = MoeLayer::Create(*f.ckpt, f.config, 0).value()->Forward(x).value();

  transport->Hold();
  absl::StatusOr<MoeLayerOutput> in_flight;
  std::thread caller([&] { in_flight = server->router().Forward(0, x, Deadline()); });
  transport->WaitSent(1);
  auto set = [&](const v1::Placement& p, v1::SetPlacementResponse* resp) {
    grpc::ClientContext ctx;
    return control->SetPlacement(&ctx, p, resp);
  };
  v1::SetPlacementResponse resp;
  grpc::Status s = set(Everywhere(f.config, 2, {"z:9"}), &resp);
  ASSERT_TRUE(s.ok()) << s.error_message();
  EXPECT_EQ(resp.epoch(), 2u);
  for (uint64_t stale : {1u, 2u}) {
    s = set(Everywhere(f.config, stale, {"y:8"}), &resp);
    EXPECT_EQ(s.error_code(), grpc::StatusCode::FAILED_PRECONDITION) << stale;
    EXPECT_NE(s.error_message().find("not newer than the current 2"), std::string::npos)
        << s.error_message();
    EXPECT_EQ(resp.epoch(), 2u);
  }
  v1::Placement partial = Everywhere(f.config, 3, {"y:8"});
  partial.mutable_entries()->RemoveLast();
  s = set(partial, &resp);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << s.error_message();
  {
    grpc::ClientContext ctx;
    v1::Placement got;
    ASSERT_TRUE(control->GetPlacement(&ctx, v1::GetPlacementRequest(), &got).ok());
    EXPECT_EQ(got.epoch(), 2u);
  }
  transport->Release();
  caller.join();
  ASSERT_TRUE(in_flight.ok()) << in_flight.status();
  EXPECT_EQ(std::memcmp(in_flight->output.raw(), want.output.raw(), want.output.nbytes()), 0);
  ASSERT_TRUE(server->router().Forward(0, x, Deadline()).ok());
  const std::vector<std::pair<std::string, uint64_t>> sent = transport->Sent();
  const std::vector<std::pair<std::string, uint64_t>> expected = {{"a:1", 1}, {"z:9", 2}};
  EXPECT_EQ(sent, expected);
}

// Readiness: an endpoint that answers but lacks an expert the placement gives it is named,
// with the first such expert.
TEST(RouterTest, CheckReadyNamesAnEndpointWithoutItsExperts) {
  Fixture f = Make(ModelFamily::kMixtral);
  auto transport = std::make_shared<FakeTransport>(*f.ckpt, f.config);
  RouterOptions ro;
  ro.model_dir = f.dir;
  ro.endpoints = {"a:1", "b:2"};  // contiguous: b:2 holds experts E/2.. of every layer
  auto router = MoeRouter::Create(ro, transport).value();
  EXPECT_TRUE(router->CheckReady(Deadline()).ok());
  const int64_t first_layer = f.config.MoeLayers().front();
  std::set<std::pair<int64_t, int32_t>> held;
  for (int64_t layer : f.config.MoeLayers()) {
    for (int32_t e = 0; e < f.config.num_experts; ++e) held.insert({layer, e});
  }
  held.erase({first_layer, static_cast<int32_t>(f.config.num_experts - 1)});
  transport->SetHeld("b:2", held);
  const absl::Status s = router->CheckReady(Deadline());
  EXPECT_EQ(s.code(), absl::StatusCode::kUnavailable);
  EXPECT_EQ(s.message(), absl::StrCat("placement epoch 1: b:2 does not hold layer ", first_layer,
                                      " expert ", f.config.num_experts - 1));

  // A new placement giving b:2 that expert again is refused before it is used, naming the
  // endpoint and the expert; the router keeps serving the table it has.
  auto next = PlacementTable::Build(f.config, PlacementPolicy::kContiguous, {"a:1", "b:2"}, 1, 2);
  ASSERT_TRUE(next.ok()) << next.status();
  const absl::Status refused = router->SetPlacement(*next, Deadline());
  EXPECT_EQ(refused.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(refused.message(), absl::StrCat("placement epoch 2: b:2 does not hold layer ",
                                            first_layer, " expert ", f.config.num_experts - 1));
  EXPECT_EQ(router->placement()->epoch(), 1u);
  // One naming an endpoint that cannot be asked is refused too.
  auto unknown =
      PlacementTable::Build(f.config, PlacementPolicy::kContiguous, {"a:1", "gone:3"}, 1, 3);
  ASSERT_TRUE(unknown.ok());
  transport->SetDown("gone:3");
  const absl::Status unreachable = router->SetPlacement(*unknown, Deadline());
  EXPECT_EQ(unreachable.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_TRUE(absl::StartsWith(unreachable.message(),
                               "placement epoch 3: cannot ask gone:3 which experts it holds"))
      << unreachable;
  // Once b:2 holds everything again, the same table is taken.
  held.insert({first_layer, static_cast<int32_t>(f.config.num_experts - 1)});
  transport->SetHeld("b:2", held);
  ASSERT_TRUE(router->SetPlacement(*next, Deadline()).ok());
  EXPECT_EQ(router->placement()->epoch(), 2u);
}

TEST(RouterFailureTest, FailsOverToAReplicaAndNamesExpertsWithNone) {
  Fixture f = Make(ModelFamily::kMixtral);
  auto transport = std::make_shared<FakeTransport>(*f.ckpt, f.config);
  RouterOptions ro;
  ro.model_dir = f.dir;
  ro.endpoints = {"a:1", "b:2"};
  ro.replicas = 2;
  auto router = MoeRouter::Create(ro, transport).value();
  const Tensor x = Input(50, f.config.hidden_size);
  const MoeLayerOutput want = MoeLayer::Create(*f.ckpt, f.config, 0).value()->Forward(x).value();
  transport->SetDown("a:1");
  auto got = router->Forward(0, x, Deadline());
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_EQ(std::memcmp(got->output.raw(), want.output.raw(), want.output.nbytes()), 0);
  EXPECT_GT(transport->Calls("b:2"), 0);

  transport->SetDown("b:2");
  auto none = router->Forward(0, x, Deadline());
  ASSERT_FALSE(none.ok());
  EXPECT_EQ(none.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_NE(none.status().message().find("every replica failed"), std::string::npos)
      << none.status();
}

// Outlier ejection: after eject_after failures in a row a destination gets no calls for
// eject_base; back on probation, one more failure ejects it again for twice as long; a
// success takes it back. Answers stay bit-identical throughout.
TEST(RouterFailureTest, EjectsAFailingDestinationAndProbesItBackIn) {
  Fixture f = Make(ModelFamily::kMixtral);
  auto transport = std::make_shared<FakeTransport>(*f.ckpt, f.config);
  RouterOptions ro;
  ro.model_dir = f.dir;
  ro.endpoints = {"a:1", "b:2"};
  ro.replicas = 2;
  ro.resilience.eject_after = 2;
  ro.resilience.eject_base = std::chrono::milliseconds(300);
  auto router = MoeRouter::Create(ro, transport).value();
  const Tensor x = Input(50, f.config.hidden_size);
  const MoeLayerOutput want = MoeLayer::Create(*f.ckpt, f.config, 0).value()->Forward(x).value();
  auto forward = [&] {
    auto got = router->Forward(0, x, Deadline());
    ASSERT_TRUE(got.ok()) << got.status();
    EXPECT_EQ(std::memcmp(got->output.raw(), want.output.raw(), want.output.nbytes()), 0);
  };
  transport->SetDown("b:2");
  forward();  // b fails, a answers its experts too: one failure
  EXPECT_TRUE(router->Ejected().empty());
  forward();  // the second in a row: ejected
  EXPECT_EQ(router->Ejected(), std::vector<std::string>{"b:2"});
  const int b_calls = transport->Calls("b:2");
  for (int i = 0; i < 5; ++i) forward();
  EXPECT_EQ(transport->Calls("b:2"), b_calls) << "an ejected destination got calls";
  // Back after 300 ms, on probation: its first failure ejects it again (for 600 ms).
  std::this_thread::sleep_for(std::chrono::milliseconds(350));
  EXPECT_TRUE(router->Ejected().empty());
  forward();
  EXPECT_EQ(transport->Calls("b:2"), b_calls + 1);
  EXPECT_EQ(router->Ejected(), std::vector<std::string>{"b:2"});
  std::this_thread::sleep_for(std::chrono::milliseconds(350));
  EXPECT_EQ(router->Ejected(), std::vector<std::string>{"b:2"}) << "the second lasts 600 ms";
  // It recovers; once the ejection ends, a success takes it back for good.
  transport->SetUp("b:2");
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  for (int i = 0; i < 4; ++i) forward();
  EXPECT_TRUE(router->Ejected().empty());
  EXPECT_GT(transport->Calls("b:2"), b_calls + 2);
}

// Never more than eject_max_share of the endpoints are ejected at once: with three
// replicas, a share of 0.5 and two of them failing, only one is ejected.
TEST(RouterFailureTest, EjectsNoMoreThanTheMaximumShare) {
  Fixture f = Make(ModelFamily::kMixtral);
  auto transport = std::make_shared<FakeTransport>(*f.ckpt, f.config);
  RouterOptions ro;
  ro.model_dir = f.dir;
  ro.endpoints = {"a:1", "b:2", "c:3"};
  ro.replicas = 3;
  ro.resilience.eject_after = 1;
  ro.resilience.eject_max_share = 0.5;
  auto router = MoeRouter::Create(ro, transport).value();
  const Tensor x = Input(50, f.config.hidden_size);
  transport->SetDown("b:2");
  transport->SetDown("c:3");
  for (int i = 0; i < 6; ++i) ASSERT_TRUE(router->Forward(0, x, Deadline()).ok());
  EXPECT_EQ(router->Ejected().size(), 1u);
}

// Hedging: calls to a slow replica are sent again to the other after hedge_after; the
// first answer wins, answers stay bit-identical, and hedges stay within their budget.
TEST(RouterFailureTest, HedgesSlowCallsWithinTheBudget) {
  Fixture f = Make(ModelFamily::kMixtral);
  auto transport = std::make_shared<FakeTransport>(*f.ckpt, f.config);
  RouterOptions ro;
  ro.model_dir = f.dir;
  ro.endpoints = {"a:1", "b:2"};
  ro.replicas = 2;
  ro.resilience.hedge_after = std::chrono::milliseconds(20);
  ro.resilience.hedge_budget = 1.0;
  auto router = MoeRouter::Create(ro, transport).value();
  const Tensor x = Input(50, f.config.hidden_size);
  const MoeLayerOutput want = MoeLayer::Create(*f.ckpt, f.config, 0).value()->Forward(x).value();
  transport->SetSlow("b:2", 1000);
  for (int i = 0; i < 4; ++i) {
    const auto start = std::chrono::steady_clock::now();
    auto got = router->Forward(0, x, Deadline());
    ASSERT_TRUE(got.ok()) << got.status();
    EXPECT_EQ(std::memcmp(got->output.raw(), want.output.raw(), want.output.nbytes()), 0);
    // Well before the slow replica's 1 s: b's calls were cancelled, not waited for.
    EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::milliseconds(800));
  }
  EXPECT_GT(router->hedges_sent(), 0);
  EXPECT_EQ(router->hedges_won(), router->hedges_sent());

  // A budget of 10%: no more hedges than a tenth of the destination calls (+1).
  ro.resilience.hedge_budget = 0.1;
  auto budgeted = MoeRouter::Create(ro, transport).value();
  // Each call makes two destination calls: after 6, at most 0.1 × 12 + 1 hedges.
  for (int i = 0; i < 6; ++i) ASSERT_TRUE(budgeted->Forward(0, x, Deadline()).ok());
  EXPECT_GT(budgeted->hedges_sent(), 0);
  EXPECT_LE(budgeted->hedges_sent(), 2);
}

TEST(RouterFailureTest, CorruptReplyIsAnErrorNotAWrongAnswer) {
  Fixture f = Make(ModelFamily::kQwen3Moe);
  auto transport = std::make_shared<FakeTransport>(*f.ckpt, f.config);
  RouterOptions ro;
  ro.model_dir = f.dir;
  ro.endpoints = {"a:1"};
  auto router = MoeRouter::Create(ro, transport).value();
  transport->SetCorrupt("a:1");
  auto got = router->Forward(0, Input(5, f.config.hidden_size), Deadline());
  ASSERT_FALSE(got.ok());
  EXPECT_EQ(got.status().code(), absl::StatusCode::kInternal) << got.status();
}

TEST(RouterTest, BadInputsAndPlacementEpochs) {
  Fixture f = Make(ModelFamily::kDeepseekV3);
  auto transport = std::make_shared<FakeTransport>(*f.ckpt, f.config);
  RouterOptions ro;
  ro.model_dir = f.dir;
  ro.endpoints = {"a:1"};
  auto router = MoeRouter::Create(ro, transport).value();
  const int64_t H = f.config.hidden_size;
  EXPECT_EQ(router->Forward(0, Input(2, H), Deadline()).status().code(),
            absl::StatusCode::kInvalidArgument);  // dense layer
  EXPECT_EQ(router->Forward(9, Input(2, H), Deadline()).status().code(),
            absl::StatusCode::kInvalidArgument);  // no such layer
  EXPECT_EQ(router->Forward(1, Input(2, H + 1), Deadline()).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(router->Forward(1, Tensor::Zeros(DType::kF32, {0, H}), Deadline()).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(router->Forward(1, Input(2, H), Deadline()).ok());

  auto same = PlacementTable::Build(f.config, PlacementPolicy::kRoundRobin, {"a:1"}, 1, 1).value();
  EXPECT_EQ(router->SetPlacement(same).code(), absl::StatusCode::kFailedPrecondition);
  auto next = PlacementTable::Build(f.config, PlacementPolicy::kRoundRobin, {"z:9"}, 1, 2).value();
  ASSERT_TRUE(router->SetPlacement(next).ok());
  EXPECT_EQ(router->placement()->epoch(), 2u);
  ASSERT_TRUE(router->Forward(1, Input(3, H), Deadline()).ok());
  EXPECT_GT(transport->Calls("z:9"), 0);
}

}  // namespace
}  // namespace moemesh

namespace moemesh {
namespace {

// Admission control: over --max-inflight-tokens a call is refused RESOURCE_EXHAUSTED at
// once (not queued), while one waiting for a forwarding slot longer than its deadline
// allows is refused DEADLINE_EXCEEDED; the admitted call is answered as usual.
TEST(RouterServerTest, ShedsOverCapacityAtOnceAndQueuedCallsPastTheirDeadline) {
  Fixture f = Make(ModelFamily::kMixtral);
  auto transport = std::make_shared<FakeTransport>(*f.ckpt, f.config);
  RouterOptions ro;
  ro.model_dir = f.dir;
  ro.endpoints = {"a:1"};
  RouterServerOptions so;
  so.max_inflight_tokens = 60;
  so.max_concurrent_infers = 1;
  auto server = RouterServer::Create(so, MoeRouter::Create(ro, transport).value()).value();
  auto infer = inference::GRPCInferenceService::NewStub(grpc::CreateChannel(
      absl::StrCat("127.0.0.1:", server->port()), grpc::InsecureChannelCredentials()));
  auto request = [&](int64_t T) {
    const Tensor x = Input(T, f.config.hidden_size);
    inference::ModelInferRequest req;
    req.set_model_name("moe");
    auto* in = req.add_inputs();
    in->set_name("hidden_states");
    in->set_datatype("FP32");
    in->add_shape(T);
    in->add_shape(f.config.hidden_size);
    req.add_raw_input_contents(std::string(static_cast<const char*>(x.raw()), x.nbytes()));
    return req;
  };
  auto call = [&](int64_t T, std::chrono::milliseconds timeout) {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + timeout);
    inference::ModelInferResponse resp;
    return infer->ModelInfer(&ctx, request(T), &resp);
  };
  // One answered call of ~0.5 s: the router now expects a call to take about that long.
  transport->SetSlow("a:1", 500);
  ASSERT_TRUE(call(10, std::chrono::seconds(30)).ok());
  transport->Hold();
  grpc::Status first;
  std::thread caller([&] { first = call(50, std::chrono::seconds(30)); });
  transport->WaitSent(2);  // 50 tokens in flight, its replies held
  const auto start = std::chrono::steady_clock::now();
  const grpc::Status over = call(20, std::chrono::seconds(30));
  EXPECT_EQ(over.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED) << over.error_message();
  EXPECT_NE(over.error_message().find("--max-inflight-tokens 60"), std::string::npos);
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(10)) << "not at once";
  // Within the token bound, but the one forwarding slot stays taken: with 0.8 s to go and
  // ~0.5 s needed, the router gives up after ~0.3 s, before the caller's deadline.
  const auto queued_at = std::chrono::steady_clock::now();
  const grpc::Status queued = call(5, std::chrono::milliseconds(800));
  EXPECT_EQ(queued.error_code(), grpc::StatusCode::DEADLINE_EXCEEDED);
  EXPECT_NE(queued.error_message().find("queued at the router"), std::string::npos)
      << queued.error_message();
  EXPECT_LT(std::chrono::steady_clock::now() - queued_at, std::chrono::milliseconds(750));
  transport->Release();
  caller.join();
  EXPECT_TRUE(first.ok()) << first.error_message();
  EXPECT_TRUE(call(20, std::chrono::seconds(30)).ok());
}

TEST(RouterServerTest, BusyPortIsAClearErrorNotACrash) {
  Fixture f = Make(ModelFamily::kMixtral);
  auto transport = std::make_shared<FakeTransport>(*f.ckpt, f.config);
  RouterOptions ro;
  ro.model_dir = f.dir;
  ro.endpoints = {"a:1"};
  auto first = RouterServer::Create({}, MoeRouter::Create(ro, transport).value());
  ASSERT_TRUE(first.ok()) << first.status();
  RouterServerOptions same_port;
  same_port.listen = absl::StrCat("127.0.0.1:", (*first)->port());
  auto second = RouterServer::Create(same_port, MoeRouter::Create(ro, transport).value());
  ASSERT_FALSE(second.ok());
  EXPECT_NE(second.status().message().find("cannot listen"), std::string::npos) << second.status();
}

}  // namespace
}  // namespace moemesh

namespace moemesh {
namespace {

using metrics::SampleValue;

TEST(RouterMetricsTest, CountsRoutedLoadDispatchAndFailures) {
  Fixture f = Make(ModelFamily::kMixtral);
  auto transport = std::make_shared<FakeTransport>(*f.ckpt, f.config);
  metrics::Registry registry;
  auto selection = ExpertSeriesSelection::Parse("auto", f.config).value();
  std::shared_ptr<RouterMetrics> m = RouterMetrics::Create(registry, f.config, selection).value();
  RouterOptions ro;
  ro.model_dir = f.dir;
  ro.endpoints = {"a:1", "b:2"};
  auto router = MoeRouter::Create(ro, transport, m).value();
  const int64_t H = f.config.hidden_size, E = f.config.num_experts, k = f.config.top_k;
  // The load each call routed, counted from the experts it reports per token (not from the
  // router's own counters).
  std::map<int64_t, std::vector<int64_t>> counted;
  for (const auto& [layer, T] :
       std::vector<std::pair<int64_t, int64_t>>{{0, 50}, {0, 30}, {1, 20}}) {
    const absl::StatusOr<MoeLayerOutput> out = router->Forward(layer, Input(T, H), Deadline());
    ASSERT_TRUE(out.ok()) << out.status();
    std::vector<int64_t>& c = counted[layer];
    c.resize(E);
    for (int64_t i = 0; i < out->topk_ids.numel(); ++i) ++c[out->topk_ids.data<int32_t>()[i]];
  }

  std::string text = registry.Serialize();
  for (int64_t layer : {0, 1}) {
    const std::vector<int64_t> load = counted[layer];
    double sum = 0;
    for (int64_t e = 0; e < E; ++e) {
      const double v =
          SampleValue(text, absl::StrCat("moemesh_router_expert_tokens_total{expert=\"", e,
                                         "\",layer=\"", layer, "\"}"));
      // Only experts that got rows have a non-zero counter, but every one has a series.
      EXPECT_EQ(v, static_cast<double>(load[e])) << "layer " << layer << " expert " << e;
      sum += v;
    }
    EXPECT_EQ(sum, (layer == 0 ? 80 : 20) * k);
  }
  EXPECT_EQ(SampleValue(text, "moemesh_router_tokens_total"), 100);
  EXPECT_EQ(SampleValue(text, "moemesh_router_layer_latency_seconds_count"), 3);
  EXPECT_EQ(SampleValue(text, "moemesh_router_dispatch_latency_seconds_count{destination=\"a:1\"}"),
            3);
  EXPECT_EQ(SampleValue(text, "moemesh_router_placement_epoch"), 1);
  EXPECT_EQ(SampleValue(text, "moemesh_router_destination_experts{destination=\"a:1\"}"),
            E);  // 2 layers × E/2
  EXPECT_EQ(
      SampleValue(text, "moemesh_router_placement_info{expert=\"0\",layer=\"1\",replicas=\"a:1\"}"),
      1);
  EXPECT_EQ(SampleValue(text, "moemesh_router_dropped_tokens_total{layer=\"0\"}"), 0);
  // The gauges are the router's windowed statistics.
  const ExpertLoadWindow::Stats st = router->LoadStats(0);
  EXPECT_EQ(SampleValue(text, "moemesh_router_expert_imbalance{layer=\"0\"}"), st.imbalance);
  EXPECT_EQ(SampleValue(text, "moemesh_router_balance_statistic{layer=\"0\"}"),
            st.balance_statistic);
  EXPECT_EQ(st.tokens, 80);
  EXPECT_EQ(st.counts, counted[0]);
  EXPECT_EQ(router->ExpertLoad(0), counted[0]);
  double p = 0;
  for (double v : st.mean_probability) p += v;
  EXPECT_NEAR(p, 1.0, 1e-6);
  EXPECT_GE(st.imbalance, 1.0);
  EXPECT_GT(st.balance_statistic, 0.5);

  // A destination that fails is counted by code, and its latency still observed.
  transport->SetDown("b:2");
  EXPECT_EQ(router->Forward(0, Input(10, H), Deadline()).status().code(),
            absl::StatusCode::kUnavailable);
  text = registry.Serialize();
  EXPECT_EQ(
      SampleValue(
          text, "moemesh_router_dispatch_failures_total{code=\"UNAVAILABLE\",destination=\"b:2\"}"),
      1);
  EXPECT_EQ(SampleValue(text, "moemesh_router_dispatch_latency_seconds_count{destination=\"b:2\"}"),
            4);
}

TEST(RouterMetricsTest, SummedSelectionAddsLayersTogether) {
  Fixture f = Make(ModelFamily::kQwen3Moe);
  auto transport = std::make_shared<FakeTransport>(*f.ckpt, f.config);
  metrics::Registry registry;
  auto m = RouterMetrics::Create(registry, f.config,
                                 ExpertSeriesSelection::Parse("sum", f.config).value())
               .value();
  RouterOptions ro;
  ro.model_dir = f.dir;
  ro.endpoints = {"a:1"};
  auto router = MoeRouter::Create(ro, transport, std::move(m)).value();
  for (int64_t layer : f.config.MoeLayers()) {
    ASSERT_TRUE(router->Forward(layer, Input(17, f.config.hidden_size), Deadline()).ok());
  }
  const std::string text = registry.Serialize();
  for (int64_t e = 0; e < f.config.num_experts; ++e) {
    double want = 0;
    for (int64_t layer : f.config.MoeLayers())
      want += static_cast<double>(router->ExpertLoad(layer)[e]);
    EXPECT_EQ(SampleValue(text, absl::StrCat("moemesh_router_expert_tokens_total{expert=\"", e,
                                             "\",layer=\"all\"}")),
              want);
  }
  EXPECT_EQ(text.find("layer=\"0\",replicas"), std::string::npos);  // no per-layer info when summed
  EXPECT_EQ(text.find("moemesh_router_expert_tokens_total{expert=\"0\",layer=\"0\"}"),
            std::string::npos);
}

TEST(RouterServerTest, ControlApiReportsWindowedLoadAndRequestCodes) {
  Fixture f = Make(ModelFamily::kMixtral);
  auto transport = std::make_shared<FakeTransport>(*f.ckpt, f.config);
  metrics::Registry registry;
  auto m = RouterMetrics::Create(registry, f.config,
                                 ExpertSeriesSelection::Parse("auto", f.config).value())
               .value();
  RouterOptions ro;
  ro.model_dir = f.dir;
  ro.endpoints = {"a:1"};
  auto server =
      RouterServer::Create({}, MoeRouter::Create(ro, transport, std::move(m)).value()).value();
  auto channel = grpc::CreateChannel(absl::StrCat("127.0.0.1:", server->port()),
                                     grpc::InsecureChannelCredentials());
  auto infer = inference::GRPCInferenceService::NewStub(channel);
  auto control = v1::RouterControl::NewStub(channel);

  const Tensor x = Input(24, f.config.hidden_size);
  for (int64_t layer : {0, 7}) {  // layer 7 does not exist
    inference::ModelInferRequest req;
    req.set_model_name("moe");
    auto* in = req.add_inputs();
    in->set_name("hidden_states");
    in->set_datatype("FP32");
    in->add_shape(24);
    in->add_shape(f.config.hidden_size);
    req.add_raw_input_contents(std::string(static_cast<const char*>(x.raw()), x.nbytes()));
    auto* l = req.add_inputs();
    l->set_name("layer");
    l->set_datatype("INT64");
    l->add_shape(1);
    req.add_raw_input_contents(std::string(reinterpret_cast<const char*>(&layer), 8));
    grpc::ClientContext ctx;
    inference::ModelInferResponse resp;
    EXPECT_EQ(infer->ModelInfer(&ctx, req, &resp).error_code(),
              layer == 0 ? grpc::StatusCode::OK : grpc::StatusCode::INVALID_ARGUMENT);
  }
  const std::string text = registry.Serialize();
  EXPECT_EQ(SampleValue(text, "moemesh_router_requests_total{code=\"OK\"}"), 1);
  EXPECT_EQ(SampleValue(text, "moemesh_router_requests_total{code=\"INVALID_ARGUMENT\"}"), 1);
  EXPECT_EQ(SampleValue(text, "moemesh_router_inflight_requests"), 0);

  grpc::ClientContext ctx;
  v1::GetExpertLoadRequest req;
  req.set_layer(0);
  v1::ExpertLoad load;
  ASSERT_TRUE(control->GetExpertLoad(&ctx, req, &load).ok());
  ASSERT_EQ(load.layers_size(), 1);
  const v1::LayerLoad& l = load.layers(0);
  const ExpertLoadWindow::Stats st = server->router().LoadStats(0);
  ASSERT_EQ(l.window_tokens_size(), f.config.num_experts);
  ASSERT_EQ(l.window_rate_size(), f.config.num_experts);
  ASSERT_EQ(l.mean_probability_size(), f.config.num_experts);
  int64_t total = 0;
  for (int e = 0; e < f.config.num_experts; ++e) {
    EXPECT_EQ(l.window_tokens(e), l.tokens(e));
    EXPECT_EQ(l.window_tokens(e), st.counts[e]);
    EXPECT_GE(l.window_rate(e), 0);
    total += l.window_tokens(e);
  }
  EXPECT_EQ(total, 24 * f.config.top_k);
  EXPECT_EQ(l.window_input_tokens(), 24);
  EXPECT_DOUBLE_EQ(l.imbalance(), st.imbalance);
  EXPECT_DOUBLE_EQ(l.balance_statistic(), st.balance_statistic);
  EXPECT_GT(l.window_seconds(), 0);
  EXPECT_LE(l.window_seconds(), 60.0);
}

// KServe v2 rules Triton enforces too: raw and typed contents never together, each input and
// requested output once, and only the model version served (ModelInfer, ModelReady,
// ModelMetadata); well-formed calls keep succeeding next to the refused ones.
TEST(RouterServerTest, KServeRequestsBreakingTheProtocolAreRefused) {
  Fixture f = Make(ModelFamily::kMixtral);
  auto transport = std::make_shared<FakeTransport>(*f.ckpt, f.config);
  RouterOptions ro;
  ro.model_dir = f.dir;
  ro.endpoints = {"a:1"};
  auto server = RouterServer::Create({}, MoeRouter::Create(ro, transport).value()).value();
  auto infer = inference::GRPCInferenceService::NewStub(grpc::CreateChannel(
      absl::StrCat("127.0.0.1:", server->port()), grpc::InsecureChannelCredentials()));
  const Tensor x = Input(4, f.config.hidden_size);
  auto good = [&] {
    inference::ModelInferRequest req;
    req.set_model_name("moe");
    auto* in = req.add_inputs();
    in->set_name("hidden_states");
    in->set_datatype("FP32");
    in->add_shape(4);
    in->add_shape(f.config.hidden_size);
    req.add_raw_input_contents(std::string(static_cast<const char*>(x.raw()), x.nbytes()));
    return req;
  };
  auto call = [&](const inference::ModelInferRequest& req) {
    grpc::ClientContext ctx;
    inference::ModelInferResponse resp;
    return infer->ModelInfer(&ctx, req, &resp);
  };
  struct Case {
    std::string what;
    std::function<void(inference::ModelInferRequest*)> edit;
    grpc::StatusCode code;
    std::string names;
  };
  const std::vector<Case> cases = {
      {"raw and typed contents",
       [](inference::ModelInferRequest* r) {
         r->mutable_inputs(0)->mutable_contents()->add_fp32_contents(1.0f);
       },
       grpc::StatusCode::INVALID_ARGUMENT, "input 'hidden_states' has typed contents"},
      {"an input twice",
       [&](inference::ModelInferRequest* r) {
         *r->add_inputs() = r->inputs(0);
         r->add_raw_input_contents(r->raw_input_contents(0));
       },
       grpc::StatusCode::INVALID_ARGUMENT, "input 'hidden_states' appears twice"},
      {"an output twice",
       [](inference::ModelInferRequest* r) {
         r->add_outputs()->set_name("output");
         r->add_outputs()->set_name("output");
       },
       grpc::StatusCode::INVALID_ARGUMENT, "requested output 'output' appears twice"},
      {"a version not served", [](inference::ModelInferRequest* r) { r->set_model_version("999"); },
       grpc::StatusCode::NOT_FOUND, "has no version '999'"},
  };
  for (const Case& c : cases) {
    inference::ModelInferRequest req = good();
    c.edit(&req);
    const grpc::Status s = call(req);
    EXPECT_EQ(s.error_code(), c.code) << c.what << ": " << s.error_message();
    EXPECT_NE(s.error_message().find(c.names), std::string::npos)
        << c.what << ": " << s.error_message();
    EXPECT_TRUE(call(good()).ok()) << "after " << c.what;
  }
  inference::ModelInferRequest v1 = good();
  v1.set_model_version("1");
  EXPECT_TRUE(call(v1).ok());

  for (const std::string version : {"999", "2"}) {
    grpc::ClientContext ctx;
    inference::ModelReadyRequest req;
    req.set_name("moe");
    req.set_version(version);
    inference::ModelReadyResponse resp;
    EXPECT_EQ(infer->ModelReady(&ctx, req, &resp).error_code(), grpc::StatusCode::NOT_FOUND);
    grpc::ClientContext ctx2;
    inference::ModelMetadataRequest mreq;
    mreq.set_name("moe");
    mreq.set_version(version);
    inference::ModelMetadataResponse mresp;
    EXPECT_EQ(infer->ModelMetadata(&ctx2, mreq, &mresp).error_code(), grpc::StatusCode::NOT_FOUND);
  }
  grpc::ClientContext ctx;
  inference::ModelReadyRequest req;
  req.set_name("moe");
  req.set_version("1");
  inference::ModelReadyResponse resp;
  EXPECT_TRUE(infer->ModelReady(&ctx, req, &resp).ok());
}

}  // namespace
}  // namespace moemesh
