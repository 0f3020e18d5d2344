#include "expert_service/expert_server.h"

#include <arpa/inet.h>
#include <gmock/gmock.h>
#include <grpcpp/generic/generic_stub.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <functional>
#include <future>
#include <map>
#include <random>
#include <thread>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "kernels/cpu/expert_ffn.h"
#include "services/metrics/testing.h"
#include "services/model/model_generator.h"
#include "services/rpc/grpc_server.h"
#include "services/rpc/wire.h"
#include "tools/process.h"

namespace moemesh {
namespace {

using ::testing::HasSubstr;

constexpr int64_t kHidden = 64;  // SmallModel's

GenModelOptions SmallModel(ModelFamily family) { return SmallModelOptions(family, /*seed=*/5); }

// Large enough for several canonical tasks of each kind (2 down tasks of 512 columns,
// 2 gate/up tasks of 8 blocks) and for a call that takes a while.
GenModelOptions WideModel() {
  GenModelOptions o;
  o.family = ModelFamily::kMixtral;
  o.hidden = 576;
  o.intermediate = 576;
  o.experts = 4;
  o.layers = 1;
  o.dtype = DType::kBF16;
  o.seed = 9;
  return o;
}

std::string Generate(const GenModelOptions& o, const std::string& name) {
  const std::string dir =
      (std::filesystem::path(::testing::TempDir()) / absl::StrCat("expert_server_test_", name))
          .string();
  const absl::Status s = GenerateModel(dir, o);
  EXPECT_TRUE(s.ok()) << s;
  return dir;
}

// Experts of the model, loaded the way a service does, for reference results.
struct Reference {
  std::unique_ptr<Checkpoint> ckpt;
  MoeModelConfig config;
  std::map<ExpertKey, ExpertWeights> experts;

  explicit Reference(const std::string& dir) {
    ckpt = Checkpoint::Open(dir).value();
    config = ParseMoeModelConfig(ckpt->config()).value();
    for (int64_t layer : config.MoeLayers()) {
      for (int32_t e = 0; e < config.num_experts; ++e) {
        experts.emplace(ExpertKey{layer, e}, LoadExpert(*ckpt, config, layer, e).value());
      }
    }
  }

  // ExpertFfn, the canonical single-threaded result, on float32 rows.
  std::vector<float> Ffn(int64_t layer, int32_t e, const std::vector<float>& x) const {
    const ExpertFfnWeights w = experts.at({layer, e}).View(config);
    const int64_t n = static_cast<int64_t>(x.size()) / config.hidden_size;
    if (n == 0) return {};
    std::vector<float> scratch(ExpertFfnScratch(w, n)), y(n * config.hidden_size);
    ExpertFfn(w, x.data(), n, scratch.data(), y.data());
    return y;
  }
};

std::vector<float> RandomRows(int64_t n, int64_t H, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd;
  std::vector<float> x(n * H);
  for (float& v : x) v = nd(rng);
  return x;
}

// Rows as the wire carries them (F32 or BF16) and the float32 values the service sees.
void SetRows(const std::vector<float>& x, int64_t H, DType dtype, v1::ExpertRows* rows,
             std::vector<float>* seen) {
  const int64_t n = static_cast<int64_t>(x.size()) / H;
  Tensor t = Tensor::Empty(DType::kF32, {n, H});  // never null, even for n = 0
  std::copy(x.begin(), x.end(), t.mutable_data<float>());
  ASSERT_TRUE(ToProto(t, dtype, rows->mutable_rows()).ok());
  const Tensor back = FromProto(rows->rows(), nullptr, "rows").value().ToF32().value();
  seen->assign(back.data<float>(), back.data<float>() + back.numel());
}

std::vector<float> OutputF32(const v1::ExpertRows& out) {
  const Tensor t = FromProto(out.rows(), nullptr, "output").value().ToF32().value();
  return std::vector<float>(t.data<float>(), t.data<float>() + t.numel());
}

bool SameBits(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() &&
         (a.empty() || std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0);
}

std::vector<float> RoundToBf16(std::vector<float> v) {
  for (float& f : v) f = Bf16ToF32(F32ToBf16(f));
  return v;
}

class ServerHarness {
 public:
  ServerHarness(const std::string& dir, std::vector<ExpertKey> experts, int pool_threads = 3,
                metrics::Registry* registry = nullptr, const std::string& expert_metrics = "auto") {
    pool_ = std::make_unique<ThreadPool>(pool_threads);
    ExpertServerOptions o;
    o.model_dir = dir;
    o.service_id = "test-expert";
    o.experts = std::move(experts);
    o.pool = pool_.get();
    o.registry = registry;
    o.expert_metrics = expert_metrics;
    auto server = ExpertServer::Create(o);
    EXPECT_TRUE(server.ok()) << server.status();
    server_ = std::move(server).value();
    grpc::ChannelArguments args;
    args.SetMaxReceiveMessageSize(256 << 20);
    args.SetMaxSendMessageSize(256 << 20);
    channel_ = grpc::CreateCustomChannel(endpoint(), grpc::InsecureChannelCredentials(), args);
    stub_ = v1::ExpertService::NewStub(channel_);
  }

  std::string endpoint() const { return absl::StrCat("127.0.0.1:", server_->port()); }
  ExpertServer& server() { return *server_; }
  v1::ExpertService::Stub& stub() { return *stub_; }

  absl::Status Compute(const v1::ComputeRequest& req, v1::ComputeResponse* resp) {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(60));
    return FromGrpcStatus(stub_->Compute(&ctx, req, resp));
  }

  // grpc.health.v1 status of the whole server: 1 SERVING, 2 NOT_SERVING.
  absl::StatusOr<int> Health() { return CheckHealth(channel_, std::chrono::seconds(10)); }

 private:
  std::unique_ptr<ThreadPool> pool_;
  std::unique_ptr<ExpertServer> server_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<v1::ExpertService::Stub> stub_;
};

std::vector<ExpertKey> All(const MoeModelConfig& c) { return ParseExpertSpec("all", c).value(); }

// --- Compute is bit-identical to ExpertFfn ------------------------------------------

class FamilyTest : public ::testing::TestWithParam<ModelFamily> {};

TEST_P(FamilyTest, ComputeIsBitIdenticalToExpertFfn) {
  const std::string dir = Generate(SmallModel(GetParam()), FamilyName(GetParam()));
  const Reference ref(dir);
  ServerHarness h(dir, All(ref.config));
  const int64_t layer = ref.config.MoeLayers().back();
  // Unordered experts, one row (GEMV path), many rows, and an empty batch.
  const std::vector<std::pair<int32_t, int64_t>> batches = {{3, 5}, {0, 1}, {7, 0}, {5, 33}};
  for (DType in : {DType::kF32, DType::kBF16}) {
    for (DType out : {DType::kF32, DType::kBF16}) {
      SCOPED_TRACE(absl::StrCat(DTypeName(in), " rows, ", DTypeName(out), " outputs"));
      v1::ComputeRequest req;
      req.set_layer(layer);
      req.set_output_dtype(ToProtoDType(out));
      std::vector<std::vector<float>> seen(batches.size());
      for (size_t i = 0; i < batches.size(); ++i) {
        v1::ExpertRows* b = req.add_batches();
        b->set_expert(batches[i].first);
        SetRows(RandomRows(batches[i].second, kHidden, 100 + i), kHidden, in, b, &seen[i]);
      }
      v1::ComputeResponse resp;
      ASSERT_TRUE(h.Compute(req, &resp).ok());
      ASSERT_EQ(resp.outputs_size(), static_cast<int>(batches.size()));
      EXPECT_GE(resp.compute_micros(), 0);
      for (size_t i = 0; i < batches.size(); ++i) {
        const v1::ExpertRows& o = resp.outputs(static_cast<int>(i));
        EXPECT_EQ(o.expert(), batches[i].first);
        EXPECT_EQ(o.rows().dtype(), ToProtoDType(out));
        EXPECT_THAT(o.rows().shape(), ::testing::ElementsAre(batches[i].second, kHidden));
        std::vector<float> want = ref.Ffn(layer, batches[i].first, seen[i]);
        if (out == DType::kBF16) want = RoundToBf16(want);
        EXPECT_TRUE(SameBits(OutputF32(o), want)) << "expert " << batches[i].first;
      }
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Families, FamilyTest,
                         ::testing::Values(ModelFamily::kMixtral, ModelFamily::kGptOss,
                                           ModelFamily::kDeepseekV3, ModelFamily::kQwen2Moe),
                         [](const auto& info) { return std::string(FamilyName(info.param)); });

TEST(ExpertServerTest, SeveralCanonicalTasksPerExpert) {
  const std::string dir = Generate(WideModel(), "wide");
  const Reference ref(dir);
  ServerHarness h(dir, All(ref.config));
  const int64_t H = ref.config.hidden_size;
  v1::ComputeRequest req;
  req.set_layer(0);
  req.set_output_dtype(v1::DATA_TYPE_F32);
  std::vector<std::vector<float>> seen(4);
  const int64_t rows[] = {7, 1, 20, 2};
  for (int32_t e = 0; e < 4; ++e) {
    v1::ExpertRows* b = req.add_batches();
    b->set_expert(e);
    SetRows(RandomRows(rows[e], H, 7 + e), H, DType::kF32, b, &seen[e]);
  }
  v1::ComputeResponse resp;
  ASSERT_TRUE(h.Compute(req, &resp).ok());
  for (int32_t e = 0; e < 4; ++e) {
    EXPECT_TRUE(SameBits(OutputF32(resp.outputs(e)), ref.Ffn(0, e, seen[e]))) << "expert " << e;
  }
}

// --- Bad requests -------------------------------------------------------------------

TEST(ExpertServerTest, BadRequestsFailClearlyAndTheServerStaysUp) {
  const std::string dir = Generate(SmallModel(ModelFamily::kDeepseekV3), "bad_requests");
  const Reference ref(dir);
  // Layer 1 experts 0-5 only; layer 0 is dense.
  ServerHarness h(dir, ParseExpertSpec("1:0-5", ref.config).value());

  const auto good = [&] {
    v1::ComputeRequest req;
    req.set_layer(1);
    req.set_output_dtype(v1::DATA_TYPE_F32);
    std::vector<float> seen;
    v1::ExpertRows* b = req.add_batches();
    b->set_expert(2);
    SetRows(RandomRows(3, kHidden, 1), kHidden, DType::kF32, b, &seen);
    return req;
  };
  struct Case {
    const char* name;
    std::function<void(v1::ComputeRequest*)> mutate;
    absl::StatusCode code;
    const char* message;
  };
  const Case cases[] = {
      {"dense layer", [](auto* r) { r->set_layer(0); }, absl::StatusCode::kInvalidArgument,
       "layer 0 is a dense layer"},
      {"missing layer", [](auto* r) { r->set_layer(9); }, absl::StatusCode::kInvalidArgument,
       "layer 9 does not exist"},
      {"expert out of range", [](auto* r) { r->mutable_batches(0)->set_expert(8); },
       absl::StatusCode::kInvalidArgument, "layer 1 expert 8: expert out of range [0, 8)"},
      {"negative expert", [](auto* r) { r->mutable_batches(0)->set_expert(-1); },
       absl::StatusCode::kInvalidArgument, "layer 1 expert -1: expert out of range"},
      {"expert twice", [](auto* r) { *r->add_batches() = r->batches(0); },
       absl::StatusCode::kInvalidArgument, "layer 1 expert 2: expert appears twice"},
      {"expert not held", [](auto* r) { r->mutable_batches(0)->set_expert(6); },
       absl::StatusCode::kNotFound, "layer 1 expert 6 is not held"},
      {"rank 1 rows",
       [](auto* r) {
         auto* t = r->mutable_batches(0)->mutable_rows();
         t->clear_shape();
         t->add_shape(3 * kHidden);
       },
       absl::StatusCode::kInvalidArgument,
       "layer 1 expert 2: rows have shape [192], expected [n, 64]"},
      {"wrong hidden size",
       [](auto* r) {
         auto* t = r->mutable_batches(0)->mutable_rows();
         t->set_shape(0, 4);
         t->set_shape(1, 48);
       },
       absl::StatusCode::kInvalidArgument, "rows have shape [4, 48], expected [n, 64]"},
      {"F16 rows",
       [](auto* r) {
         auto* t = r->mutable_batches(0)->mutable_rows();
         t->set_dtype(v1::DATA_TYPE_F16);
         t->set_shape(0, 6);
       },
       absl::StatusCode::kInvalidArgument,
       "layer 1 expert 2: rows have dtype F16, expected F32 or BF16"},
      {"I32 rows",
       [](auto* r) { r->mutable_batches(0)->mutable_rows()->set_dtype(v1::DATA_TYPE_I32); },
       absl::StatusCode::kInvalidArgument, "rows have dtype I32"},
      {"unset rows dtype",
       [](auto* r) { r->mutable_batches(0)->mutable_rows()->set_dtype(v1::DATA_TYPE_UNSPECIFIED); },
       absl::StatusCode::kInvalidArgument, "layer 1 expert 2: unsupported wire dtype 0"},
      {"short data",
       [](auto* r) { r->mutable_batches(0)->mutable_rows()->mutable_data()->pop_back(); },
       absl::StatusCode::kInvalidArgument, "layer 1 expert 2: F32[3, 64] needs 768 bytes, got 767"},
      {"negative dimension",
       [](auto* r) { r->mutable_batches(0)->mutable_rows()->set_shape(0, -3); },
       absl::StatusCode::kInvalidArgument, "negative dimension"},
      {"unset output dtype", [](auto* r) { r->set_output_dtype(v1::DATA_TYPE_UNSPECIFIED); },
       absl::StatusCode::kInvalidArgument, "layer 1: output_dtype 0 is not F32 (1) or BF16 (2)"},
      {"F16 output", [](auto* r) { r->set_output_dtype(v1::DATA_TYPE_F16); },
       absl::StatusCode::kInvalidArgument, "output_dtype 3 is not F32"},
      {"unknown output dtype", [](auto* r) { r->set_output_dtype(static_cast<v1::DataType>(77)); },
       absl::StatusCode::kInvalidArgument, "output_dtype 77"},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.name);
    v1::ComputeRequest req = good();
    c.mutate(&req);
    v1::ComputeResponse resp;
    const absl::Status s = h.Compute(req, &resp);
    EXPECT_EQ(s.code(), c.code) << s;
    EXPECT_THAT(std::string(s.message()), HasSubstr(c.message));
    // The next good call still succeeds.
    v1::ComputeResponse ok;
    ASSERT_TRUE(h.Compute(good(), &ok).ok());
    EXPECT_EQ(ok.outputs_size(), 1);
  }
  // An empty request is valid: nothing to compute.
  v1::ComputeRequest empty;
  empty.set_layer(1);
  empty.set_output_dtype(v1::DATA_TYPE_BF16);
  v1::ComputeResponse resp;
  ASSERT_TRUE(h.Compute(empty, &resp).ok());
  EXPECT_EQ(resp.outputs_size(), 0);
}

TEST(ExpertServerTest, OversizedRequestIsRefused) {
  const std::string dir = Generate(SmallModel(ModelFamily::kMixtral), "oversized");
  auto pool = std::make_unique<ThreadPool>(2);
  ExpertServerOptions o;
  o.model_dir = dir;
  o.experts = {{0, 0}};
  o.max_message_bytes = 4096;
  o.pool = pool.get();
  auto server = ExpertServer::Create(o).value();
  auto stub = v1::ExpertService::NewStub(grpc::CreateChannel(
      absl::StrCat("127.0.0.1:", server->port()), grpc::InsecureChannelCredentials()));
  v1::ComputeRequest req;
  req.set_output_dtype(v1::DATA_TYPE_F32);
  std::vector<float> seen;
  v1::ExpertRows* b = req.add_batches();
  SetRows(RandomRows(100, kHidden, 3), kHidden, DType::kF32, b, &seen);
  grpc::ClientContext ctx;
  v1::ComputeResponse resp;
  EXPECT_EQ(stub->Compute(&ctx, req, &resp).error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
}

// --- Concurrency, control, health, shutdown -----------------------------------------

TEST(ExpertServerTest, ConcurrentClientsGetCorrectResults) {
  const std::string dir = Generate(SmallModel(ModelFamily::kMixtral), "concurrent");
  const Reference ref(dir);
  ServerHarness h(dir, All(ref.config));
  constexpr int kClients = 8, kCalls = 25;
  std::atomic<int> wrong{0}, failed{0};
  std::vector<std::thread> clients;
  for (int c = 0; c < kClients; ++c) {
    clients.emplace_back([&, c] {
      std::mt19937 rng(c);
      for (int call = 0; call < kCalls; ++call) {
        const int64_t layer = rng() % 2;
        v1::ComputeRequest req;
        req.set_layer(layer);
        req.set_output_dtype(call % 2 ? v1::DATA_TYPE_BF16 : v1::DATA_TYPE_F32);
        std::vector<int32_t> experts;
        std::vector<std::vector<float>> seen;
        for (int32_t e = 0; e < 8; ++e) {
          if (rng() % 2) continue;
          experts.push_back(e);
          seen.emplace_back();
          v1::ExpertRows* b = req.add_batches();
          b->set_expert(e);
          SetRows(RandomRows(1 + rng() % 9, kHidden, rng()), kHidden, DType::kBF16, b,
                  &seen.back());
        }
        v1::ComputeResponse resp;
        if (!h.Compute(req, &resp).ok() ||
            resp.outputs_size() != static_cast<int>(experts.size())) {
          ++failed;
          continue;
        }
        for (size_t i = 0; i < experts.size(); ++i) {
          std::vector<float> want = ref.Ffn(layer, experts[i], seen[i]);
          if (call % 2) want = RoundToBf16(want);
          if (!SameBits(OutputF32(resp.outputs(static_cast<int>(i))), want)) ++wrong;
        }
      }
    });
  }
  for (auto& t : clients) t.join();
  EXPECT_EQ(failed.load(), 0);
  EXPECT_EQ(wrong.load(), 0);
  EXPECT_EQ(h.server().in_flight(), 0);
}

TEST(ExpertServerTest, LoadUnloadAndInfo) {
  const std::string dir = Generate(SmallModel(ModelFamily::kMixtral), "control");
  const Reference ref(dir);
  ServerHarness h(dir, {});
  const auto info = [&] {
    grpc::ClientContext ctx;
    v1::InfoResponse resp;
    EXPECT_TRUE(h.stub().Info(&ctx, v1::InfoRequest(), &resp).ok());
    return resp;
  };
  v1::InfoResponse i0 = info();
  EXPECT_EQ(i0.model_type(), "mixtral");
  EXPECT_EQ(i0.hidden_size(), kHidden);
  EXPECT_EQ(i0.num_experts(), 8);
  EXPECT_EQ(i0.experts_size(), 0);
  EXPECT_EQ(i0.weight_bytes(), 0);
  EXPECT_EQ(i0.service_id(), "test-expert");

  v1::ComputeRequest req;
  req.set_layer(1);
  req.set_output_dtype(v1::DATA_TYPE_F32);
  std::vector<float> seen;
  v1::ExpertRows* b = req.add_batches();
  b->set_expert(2);
  SetRows(RandomRows(4, kHidden, 8), kHidden, DType::kF32, b, &seen);
  v1::ComputeResponse resp;
  EXPECT_EQ(h.Compute(req, &resp).code(), absl::StatusCode::kNotFound);

  const int64_t one = ref.experts.at({1, 2}).bytes();
  const auto load = [&](std::vector<ExpertKey> keys, v1::LoadExpertsResponse* r) {
    v1::LoadExpertsRequest lr;
    for (const auto& [l, e] : keys) {
      lr.add_experts()->set_layer(l);
      lr.mutable_experts(lr.experts_size() - 1)->set_expert(e);
    }
    grpc::ClientContext ctx;
    return FromGrpcStatus(h.stub().LoadExperts(&ctx, lr, r));
  };
  const auto unload = [&](std::vector<ExpertKey> keys, v1::UnloadExpertsResponse* r) {
    v1::UnloadExpertsRequest ur;
    for (const auto& [l, e] : keys) {
      ur.add_experts()->set_layer(l);
      ur.mutable_experts(ur.experts_size() - 1)->set_expert(e);
    }
    grpc::ClientContext ctx;
    return FromGrpcStatus(h.stub().UnloadExperts(&ctx, ur, r));
  };
  v1::LoadExpertsResponse lr;
  ASSERT_TRUE(load({{1, 2}, {1, 3}}, &lr).ok());
  EXPECT_EQ(lr.experts_loaded(), 2);
  EXPECT_EQ(lr.weight_bytes(), 2 * one);
  ASSERT_TRUE(load({{1, 2}}, &lr).ok());  // idempotent
  EXPECT_EQ(lr.experts_loaded(), 2);
  const absl::Status bad = load({{0, 4}, {1, 99}}, &lr);
  EXPECT_EQ(bad.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(bad.message()), HasSubstr("layer 1 expert 99"));
  EXPECT_EQ(h.server().store().size(), 2);  // nothing of the bad list was loaded

  resp.Clear();
  ASSERT_TRUE(h.Compute(req, &resp).ok());
  EXPECT_TRUE(SameBits(OutputF32(resp.outputs(0)), ref.Ffn(1, 2, seen)));

  v1::UnloadExpertsResponse ur;
  ASSERT_TRUE(unload({{1, 2}}, &ur).ok());
  EXPECT_EQ(ur.experts_loaded(), 1);
  EXPECT_EQ(ur.weight_bytes(), one);
  ASSERT_TRUE(unload({{1, 2}}, &ur).ok());  // idempotent
  const absl::Status bad_unload = unload({{5, 1}}, &ur);
  EXPECT_EQ(bad_unload.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(bad_unload.message()), HasSubstr("layer 5 expert 1"));
  EXPECT_EQ(h.Compute(req, &resp).code(), absl::StatusCode::kNotFound);

  const v1::InfoResponse i1 = info();
  ASSERT_EQ(i1.experts_size(), 1);
  EXPECT_EQ(i1.experts(0).layer(), 1);
  EXPECT_EQ(i1.experts(0).expert(), 3);
  EXPECT_EQ(i1.weight_bytes(), one);
}

TEST(ExpertServerTest, HealthIsServing) {
  const std::string dir = Generate(SmallModel(ModelFamily::kMixtral), "health");
  ServerHarness h(dir, {{0, 1}});
  const auto status = h.Health();
  ASSERT_TRUE(status.ok()) << status.status();
  EXPECT_EQ(*status, 1);  // SERVING
}

TEST(ExpertServerTest, ShutdownDrainsAnInFlightCall) {
  const std::string dir = Generate(WideModel(), "wide");
  const Reference ref(dir);
  // One thread: the call below takes long enough to be in flight at Shutdown.
  ServerHarness h(dir, All(ref.config), /*pool_threads=*/1);
  const int64_t H = ref.config.hidden_size;
  v1::ComputeRequest req;
  req.set_layer(0);
  req.set_output_dtype(v1::DATA_TYPE_F32);
  std::vector<float> seen;
  v1::ExpertRows* b = req.add_batches();
  b->set_expert(1);
  SetRows(RandomRows(4000, H, 4), H, DType::kF32, b, &seen);

  grpc::ClientContext ctx;
  v1::ComputeResponse resp;
  std::promise<grpc::Status> done;
  h.stub().async()->Compute(&ctx, &req, &resp, [&](grpc::Status s) { done.set_value(s); });
  while (h.server().in_flight() == 0) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  h.server().Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(60));
  EXPECT_EQ(h.server().in_flight(), 0);  // Shutdown returned after the call finished

  const grpc::Status s = done.get_future().get();
  ASSERT_TRUE(s.ok()) << s.error_message();
  EXPECT_TRUE(SameBits(OutputF32(resp.outputs(0)), ref.Ffn(0, 1, seen)));
  // New calls are refused.
  v1::ComputeResponse after;
  EXPECT_EQ(h.Compute(req, &after).code(), absl::StatusCode::kUnavailable);
  h.server().Wait();
}

// --- Options and start-up -------------------------------------------------------------

TEST(ExpertServerTest, OptionsValidateNameTheField) {
  const auto bad = [](std::function<void(ExpertServerOptions*)> f) {
    ExpertServerOptions o;
    o.model_dir = "/m";
    f(&o);
    return std::string(o.Validate().message());
  };
  EXPECT_TRUE(bad([](auto*) {}).empty());
  EXPECT_THAT(bad([](auto* o) { o->model_dir.clear(); }), HasSubstr("model_dir"));
  EXPECT_THAT(bad([](auto* o) { o->listen.clear(); }), HasSubstr("listen"));
  EXPECT_THAT(bad([](auto* o) { o->listen = "127.0.0.1"; }), HasSubstr("HOST:PORT"));
  EXPECT_THAT(bad([](auto* o) { o->listen = "127.0.0.1:99999"; }), HasSubstr("port"));
  EXPECT_TRUE(bad([](auto* o) { o->listen = "[::]:50051"; }).empty());
  EXPECT_THAT(bad([](auto* o) { o->service_id.clear(); }), HasSubstr("service_id"));
  EXPECT_THAT(bad([](auto* o) { o->max_message_bytes = 0; }), HasSubstr("max_message_bytes"));
  EXPECT_THAT(bad([](auto* o) { o->compute_threads = 0; }), HasSubstr("compute_threads"));
}

TEST(ExpertServerTest, CreateFailsClearly) {
  const std::string dir = Generate(SmallModel(ModelFamily::kDeepseekV3), "create");
  ExpertServerOptions o;
  o.model_dir = "/nonexistent/model";
  EXPECT_THAT(std::string(ExpertServer::Create(o).status().message()),
              HasSubstr("/nonexistent/model"));
  o.model_dir = dir;
  o.experts = {{0, 1}};
  const absl::Status dense = ExpertServer::Create(o).status();
  EXPECT_EQ(dense.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(dense.message()), HasSubstr("layer 0 expert 1"));
  // A port another socket holds (without SO_REUSEPORT, so gRPC cannot share it).
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof addr;
  ASSERT_EQ(::bind(fd, reinterpret_cast<sockaddr*>(&addr), len), 0);
  ASSERT_EQ(::listen(fd, 1), 0);
  ASSERT_EQ(::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len), 0);
  o.experts = {{1, 1}};
  o.listen = absl::StrCat("127.0.0.1:", ntohs(addr.sin_port));
  const absl::Status busy = ExpertServer::Create(o).status();
  ::close(fd);
  EXPECT_EQ(busy.code(), absl::StatusCode::kUnavailable) << busy;
  EXPECT_THAT(std::string(busy.message()), HasSubstr(o.listen));
}

// --- ParseExpertSpec ----------------------------------------------------------------

MoeModelConfig SpecConfig() {
  MoeModelConfig c;  // DeepSeek-style: layer 0 dense, layers 1 and 2 MoE, 8 experts
  c.family = ModelFamily::kDeepseekV3;
  c.num_layers = 3;
  c.num_experts = 8;
  c.first_k_dense_replace = 1;
  return c;
}

std::vector<ExpertKey> Spec(const std::string& spec) {
  auto keys = ParseExpertSpec(spec, SpecConfig());
  EXPECT_TRUE(keys.ok()) << spec << ": " << keys.status();
  return keys.ok() ? *keys : std::vector<ExpertKey>{};
}

TEST(ParseExpertSpecTest, Forms) {
  EXPECT_EQ(Spec("all").size(), 16u);
  EXPECT_EQ(Spec("all").front(), ExpertKey(1, 0));
  EXPECT_TRUE(Spec("none").empty());
  EXPECT_EQ(Spec("0-1"), (std::vector<ExpertKey>{{1, 0}, {1, 1}, {2, 0}, {2, 1}}));
  EXPECT_EQ(Spec("5,0-1"),
            (std::vector<ExpertKey>{{1, 0}, {1, 1}, {1, 5}, {2, 0}, {2, 1}, {2, 5}}));
  EXPECT_EQ(Spec("2:4-5;1:0-1,7"),
            (std::vector<ExpertKey>{{1, 0}, {1, 1}, {1, 7}, {2, 4}, {2, 5}}));
  EXPECT_EQ(Spec("7"), (std::vector<ExpertKey>{{1, 7}, {2, 7}}));
  EXPECT_EQ(Spec("1,1,0-1"), (std::vector<ExpertKey>{{1, 0}, {1, 1}, {2, 0}, {2, 1}}));
  EXPECT_EQ(Spec("1:3;1:3"), (std::vector<ExpertKey>{{1, 3}}));
}

TEST(ParseExpertSpecTest, ErrorsNameTheBadPart) {
  const std::pair<const char*, const char*> cases[] = {
      {"", "'' is not E or E0-E1"},         {"8", "'8' is not a range within [0, 8)"},
      {"3-1", "'3-1' is not a range"},      {"-1", "'-1' is not E or E0-E1"},
      {"0-", "'0-' is not E or E0-E1"},     {"a", "'a' is not E or E0-E1"},
      {"0,,1", "'' is not E or E0-E1"},     {"0-1-2", "'0-1-2' is not E or E0-E1"},
      {"0:1", "layer 0 is a dense layer"},  {"3:1", "layer 3 does not exist"},
      {"1:", "'' is not E or E0-E1"},       {"x:1", "'x:1' is not LAYER:RANGES"},
      {"1:0;2", "'2' is not LAYER:RANGES"}, {"1:0;", "'' is not LAYER:RANGES"},
      {"ALL", "'ALL' is not E or E0-E1"},
  };
  for (const auto& [spec, message] : cases) {
    const auto keys = ParseExpertSpec(spec, SpecConfig());
    EXPECT_EQ(keys.status().code(), absl::StatusCode::kInvalidArgument) << spec;
    EXPECT_THAT(std::string(keys.status().message()), HasSubstr(message)) << spec;
  }
}

// --- The executable -----------------------------------------------------------------

#ifdef MOEMESH_EXPERT_BINARY
TEST(ExpertServiceProcessTest, ListensServesAndStopsOnSigterm) {
  if (!std::filesystem::exists(MOEMESH_EXPERT_BINARY)) {
    FAIL() << MOEMESH_EXPERT_BINARY << " is not built";
  }
  const std::string dir = Generate(SmallModel(ModelFamily::kMixtral), "process");
  auto p = ChildProcess::Start({MOEMESH_EXPERT_BINARY, "--model", dir, "--listen", "127.0.0.1:0",
                                "--service-id", "proc", "--experts", "1:0-2", "--threads", "2"})
               .value();
  const auto endpoint = p->WaitListening(std::chrono::seconds(60));
  ASSERT_TRUE(endpoint.ok()) << endpoint.status();
  int port = 0;
  ASSERT_TRUE(absl::SimpleAtoi(endpoint->substr(endpoint->rfind(':') + 1), &port));
  EXPECT_GT(port, 0);
  EXPECT_EQ(endpoint->substr(0, endpoint->rfind(':')), "127.0.0.1");

  // The callback API, as the router's transport uses: its threads keep polling the
  // connection, so the server's shutdown handshake with this client is answered at
  // once (an idle blocking-API channel answers only on gRPC's 5 s backup poll).
  auto stub = v1::ExpertService::NewStub(
      grpc::CreateChannel(*endpoint, grpc::InsecureChannelCredentials()));
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
  const v1::InfoRequest req;
  v1::InfoResponse info;
  std::promise<grpc::Status> done;
  stub->async()->Info(&ctx, &req, &info, [&](grpc::Status s) { done.set_value(s); });
  ASSERT_TRUE(done.get_future().get().ok());
  EXPECT_EQ(info.service_id(), "proc");
  EXPECT_EQ(info.experts_size(), 3);
  const auto stop = std::chrono::steady_clock::now();
  EXPECT_EQ(p->Signal(SIGTERM, /*wait=*/true), 0);
  EXPECT_LT(std::chrono::steady_clock::now() - stop, std::chrono::seconds(4));
}

TEST(ExpertServiceProcessTest, BadFlagsExitNonZero) {
  if (!std::filesystem::exists(MOEMESH_EXPERT_BINARY)) {
    FAIL() << MOEMESH_EXPERT_BINARY << " is not built";
  }
  const std::string dir = Generate(SmallModel(ModelFamily::kMixtral), "process_bad");
  auto p = ChildProcess::Start({MOEMESH_EXPERT_BINARY, "--model", dir, "--experts", "9"}).value();
  EXPECT_FALSE(p->WaitListening(std::chrono::seconds(60)).ok());
  EXPECT_EQ(p->Signal(SIGTERM, /*wait=*/true), 1);
}
#endif

}  // namespace
}  // namespace moemesh

namespace moemesh {
namespace {

using metrics::SampleValue;

TEST(ExpertServerMetricsTest, CountsCallsRowsAndHeldExperts) {
  const std::string dir = Generate(SmallModel(ModelFamily::kQwen3Moe), "metrics");
  const Reference ref(dir);
  metrics::Registry registry;
  ServerHarness h(dir, {{0, 1}, {0, 2}, {1, 2}}, 2, &registry);
  std::string text = registry.Serialize();
  EXPECT_EQ(SampleValue(text, "moemesh_expert_experts_loaded"), 3);
  EXPECT_EQ(SampleValue(text, "moemesh_expert_weight_bytes"),
            static_cast<double>(h.server().store().weight_bytes()));
  EXPECT_EQ(SampleValue(text, "moemesh_expert_service_info{service_id=\"test-expert\"}"), 1);

  v1::ComputeRequest req;
  req.set_layer(0);
  req.set_output_dtype(v1::DATA_TYPE_F32);
  std::vector<float> seen;
  SetRows(
      RandomRows(5, kHidden, 1), kHidden, DType::kF32,
      [&] {
        auto* b = req.add_batches();
        b->set_expert(1);
        return b;
      }(),
      &seen);
  SetRows(
      RandomRows(7, kHidden, 2), kHidden, DType::kBF16,
      [&] {
        auto* b = req.add_batches();
        b->set_expert(2);
        return b;
      }(),
      &seen);
  v1::ComputeResponse resp;
  ASSERT_TRUE(h.Compute(req, &resp).ok());
  ASSERT_TRUE(h.Compute(req, &resp).ok());
  req.mutable_batches(0)->set_expert(5);  // not held: NOT_FOUND
  EXPECT_EQ(h.Compute(req, &resp).code(), absl::StatusCode::kNotFound);

  text = registry.Serialize();
  EXPECT_EQ(SampleValue(text, "moemesh_expert_requests_total{code=\"OK\"}"), 2);
  EXPECT_EQ(SampleValue(text, "moemesh_expert_requests_total{code=\"NOT_FOUND\"}"), 1);
  EXPECT_EQ(SampleValue(text, "moemesh_expert_compute_latency_seconds_count"), 3);
  EXPECT_EQ(SampleValue(text, "moemesh_expert_batch_tokens_count"), 2);  // computed calls only
  EXPECT_EQ(SampleValue(text, "moemesh_expert_batch_tokens_sum"), 24);
  EXPECT_EQ(SampleValue(text, "moemesh_expert_batch_tokens_bucket{le=\"16\"}"), 2);
  EXPECT_EQ(SampleValue(text, "moemesh_expert_batch_tokens_bucket{le=\"8\"}"), 0);
  EXPECT_EQ(SampleValue(text, "moemesh_expert_tokens_total{expert=\"1\",layer=\"0\"}"), 10);
  EXPECT_EQ(SampleValue(text, "moemesh_expert_tokens_total{expert=\"2\",layer=\"0\"}"), 14);
  EXPECT_EQ(SampleValue(text, "moemesh_expert_inflight_requests"), 0);

  // Unloading shows in the gauges at the next scrape.
  ASSERT_TRUE(h.server().store().Unload({{0, 1}}).ok());
  EXPECT_EQ(SampleValue(registry.Serialize(), "moemesh_expert_experts_loaded"), 2);
}

TEST(ExpertServerMetricsTest, BadSelectionFailsCreate) {
  const std::string dir = Generate(SmallModel(ModelFamily::kMixtral), "metrics_bad");
  metrics::Registry registry;
  ExpertServerOptions o;
  o.model_dir = dir;
  o.registry = &registry;
  o.expert_metrics = "0,5";
  auto server = ExpertServer::Create(o);
  ASSERT_FALSE(server.ok());
  EXPECT_EQ(server.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(server.status().message(), HasSubstr("--expert-metrics"));
}

}  // namespace
}  // namespace moemesh
