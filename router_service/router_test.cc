// MoeRouter against an in-process fake transport: the experts are computed by the same
// kernels in this process, replies arrive from other threads in scrambled order, and
// chosen endpoints can be made to fail.
#include "router_service/router.h"

#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <random>
#include <set>
#include <thread>

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
    const bool down = down_.count(endpoint) > 0;
    const bool corrupt = corrupt_.count(endpoint) > 0;
    const int delay_us = static_cast<int>(rng_() % 2000);
    threads_.emplace_back([this, endpoint, down, corrupt, delay_us, done = std::move(done),
                           request = std::shared_ptr<v1::ComputeRequest>(std::move(request))] {
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
  absl::Status Info(const std::string&, Clock::time_point, v1::InfoResponse*) override {
    return absl::OkStatus();
  }

  void SetDown(const std::string& e) {
    std::lock_guard<std::mutex> l(mu_);
    down_.insert(e);
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
  ASSERT_TRUE(router->Forward(0, Input(50, H), Deadline()).ok());
  ASSERT_TRUE(router->Forward(0, Input(30, H), Deadline()).ok());
  ASSERT_TRUE(router->Forward(1, Input(20, H), Deadline()).ok());

  std::string text = registry.Serialize();
  for (int64_t layer : {0, 1}) {
    const std::vector<int64_t> load = router->ExpertLoad(layer);
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
  EXPECT_EQ(st.counts, router->ExpertLoad(0));
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

}  // namespace
}  // namespace moemesh
