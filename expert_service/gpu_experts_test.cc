// The expert service with --device cuda: the same answers as the CPU service within BF16
// tolerance, for every family, over F32 and BF16 wires; Load/Unload keep the GPU in step;
// Info reports the GPU's memory. Without a GPU (or a CUDA build) the device cases skip
// and --device cuda must fail with an error that says why.
#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>

#include <atomic>
#include <cmath>
#include <filesystem>
#include <numeric>
#include <random>
#include <thread>

#include "absl/strings/str_cat.h"
#include "expert_service/expert_server.h"
#include "services/base/status_macros.h"
#include "services/cuda/testing.h"
#include "services/model/model_generator.h"
#include "services/rpc/wire.h"

namespace moemesh {
namespace {

std::string Generate(ModelFamily family) {
  const std::string dir = (std::filesystem::path(::testing::TempDir()) /
                           absl::StrCat("gpu_experts_test_", FamilyName(family)))
                              .string();
  // Hidden 64, intermediate 48: multiples of the kernels' 16.
  EXPECT_TRUE(GenerateModel(dir, SmallModelOptions(family, /*seed=*/11)).ok());
  return dir;
}

struct Service {
  std::unique_ptr<metrics::Registry> registry = std::make_unique<metrics::Registry>();
  std::unique_ptr<ExpertServer> server;
  std::unique_ptr<v1::ExpertService::Stub> stub;

  // gpus: none on the CPU, else those CUDA devices.
  static absl::StatusOr<Service> Start(const std::string& dir, std::vector<int> gpus) {
    ExpertServerOptions o;
    o.model_dir = dir;
    o.service_id = gpus.empty() ? "cpu" : "gpu";
    o.gpus = std::move(gpus);
    ASSIGN_OR_RETURN(std::unique_ptr<Checkpoint> ckpt, Checkpoint::Open(dir));
    ASSIGN_OR_RETURN(MoeModelConfig config, ParseMoeModelConfig(ckpt->config()));
    ASSIGN_OR_RETURN(o.experts, ParseExpertSpec("all", config));
    Service s;
    o.registry = s.registry.get();
    ASSIGN_OR_RETURN(s.server, ExpertServer::Create(o));
    s.stub = v1::ExpertService::NewStub(grpc::CreateChannel(
        absl::StrCat("127.0.0.1:", s.server->port()), grpc::InsecureChannelCredentials()));
    return s;
  }
  absl::Status Compute(const v1::ComputeRequest& req, v1::ComputeResponse* resp) {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(60));
    return FromGrpcStatus(stub->Compute(&ctx, req, resp));
  }
};

TEST(GpuExpertsTest, DeviceCudaWithoutAGpuSaysWhy) {
  if (cuda_testing::PluginGpuCount() > 0) {
    GTEST_SKIP() << "a GPU is here: the device cases run instead";
  }
  const std::string dir = Generate(ModelFamily::kMixtral);
  auto s = Service::Start(dir, {0});
  ASSERT_FALSE(s.ok());
  EXPECT_TRUE(s.status().code() == absl::StatusCode::kFailedPrecondition ||
              s.status().code() == absl::StatusCode::kUnimplemented)
      << s.status();
  EXPECT_NE(s.status().message().find("--device cuda"), std::string::npos) << s.status();
}

// ‖got − want‖ / ‖want‖ of two outputs' rows; infinite when their shapes differ or a
// value is not finite.
double OutputRelErr(const v1::ExpertRows& got, const v1::ExpertRows& want) {
  const absl::StatusOr<Tensor> g = FromProto(got.rows(), nullptr, "gpu");
  const absl::StatusOr<Tensor> w = FromProto(want.rows(), nullptr, "cpu");
  if (!g.ok() || !w.ok() || g->shape() != w->shape() || g->dtype() != DType::kF32 ||
      w->dtype() != DType::kF32) {
    return INFINITY;
  }
  double num = 0, den = 0;
  for (int64_t i = 0; i < w->numel(); ++i) {
    const double a = g->data<float>()[i], b = w->data<float>()[i];
    if (!std::isfinite(a)) return INFINITY;
    num += (a - b) * (a - b);
    den += b * b;
  }
  return std::sqrt(num / std::max(den, 1e-30));
}

// Appends a batch of n random rows for `expert`, as `wire` carries them.
absl::Status AddRandomRows(v1::ComputeRequest* req, int32_t expert, int64_t n, int64_t H,
                           DType wire, std::mt19937& rng) {
  std::normal_distribution<float> nd;
  Tensor x = Tensor::Empty(DType::kF32, {n, H});
  for (int64_t i = 0; i < n * H; ++i) x.mutable_data<float>()[i] = nd(rng);
  v1::ExpertRows* b = req->add_batches();
  b->set_expert(expert);
  return ToProto(x, wire, b->mutable_rows());
}

// One generated model served twice: on the CPU and on GPU 0 (or on `gpus`).
struct CpuAndGpu {
  Service cpu, gpu;
  int64_t hidden = 0, layer = 0;

  absl::Status Start(ModelFamily family, std::vector<int> gpus = {0}) {
    const std::string dir = Generate(family);
    ASSIGN_OR_RETURN(cpu, Service::Start(dir, {}));
    ASSIGN_OR_RETURN(gpu, Service::Start(dir, std::move(gpus)));
    const MoeModelConfig& config = gpu.server->store().config();
    hidden = config.hidden_size;
    layer = config.MoeLayers().back();
    return absl::OkStatus();
  }
  // Both answer `req`, the GPU within BF16 tolerance of the CPU, expert by expert.
  void ExpectSameAnswers(const v1::ComputeRequest& req) {
    v1::ComputeResponse want, got;
    ASSERT_TRUE(cpu.Compute(req, &want).ok());
    const absl::Status computed = gpu.Compute(req, &got);
    ASSERT_TRUE(computed.ok()) << computed;
    ASSERT_EQ(got.outputs_size(), want.outputs_size());
    for (int i = 0; i < want.outputs_size(); ++i) {
      EXPECT_EQ(got.outputs(i).expert(), want.outputs(i).expert());
      EXPECT_LE(OutputRelErr(got.outputs(i), want.outputs(i)), 1e-2)
          << "expert " << want.outputs(i).expert();
    }
  }
};

class GpuFamilyTest : public ::testing::TestWithParam<ModelFamily> {};

TEST_P(GpuFamilyTest, MatchesTheCpuServiceWithinBf16Tolerance) {
  SKIP_WITHOUT_PLUGIN_GPU();
  CpuAndGpu s;
  const absl::Status started = s.Start(GetParam());
  ASSERT_TRUE(started.ok()) << started;
  const int64_t H = s.hidden, layer = s.layer;
  std::mt19937 rng(GetParam() == ModelFamily::kMixtral ? 1 : 2);
  for (DType wire : {DType::kF32, DType::kBF16}) {
    SCOPED_TRACE(DTypeName(wire));
    v1::ComputeRequest req;
    req.set_layer(layer);
    req.set_output_dtype(v1::DATA_TYPE_F32);
    // Experts out of order, one empty, sizes across the 64-row tiles.
    const std::vector<std::pair<int32_t, int64_t>> batches = {{5, 33}, {0, 1}, {3, 0}, {7, 130}};
    for (const auto& [e, n] : batches) ASSERT_TRUE(AddRandomRows(&req, e, n, H, wire, rng).ok());
    s.ExpectSameAnswers(req);
  }
  // Unloaded on the service, gone from the GPU; Info tells the GPU's memory.
  grpc::ClientContext ctx;
  v1::UnloadExpertsRequest un;
  v1::ExpertId* id = un.add_experts();
  id->set_layer(layer);
  id->set_expert(5);
  v1::UnloadExpertsResponse un_resp;
  ASSERT_TRUE(s.gpu.stub->UnloadExperts(&ctx, un, &un_resp).ok());
  v1::ComputeRequest again;
  again.set_layer(layer);
  again.set_output_dtype(v1::DATA_TYPE_F32);
  v1::ExpertRows* b = again.add_batches();
  b->set_expert(5);
  ASSERT_TRUE(ToProto(Tensor::Empty(DType::kF32, {1, H}), DType::kF32, b->mutable_rows()).ok());
  v1::ComputeResponse resp;
  EXPECT_EQ(s.gpu.Compute(again, &resp).code(), absl::StatusCode::kNotFound);
  grpc::ClientContext info_ctx;
  v1::InfoResponse info;
  ASSERT_TRUE(s.gpu.stub->Info(&info_ctx, v1::InfoRequest(), &info).ok());
  EXPECT_EQ(info.device(), "cuda:0");
  EXPECT_GT(info.gpu_weight_bytes(), 0);
  EXPECT_GT(info.gpu_total_bytes(), info.gpu_weight_bytes());
  ASSERT_EQ(info.gpus_size(), 1);
  EXPECT_EQ(info.gpus(0).weight_bytes(), info.gpu_weight_bytes());
  EXPECT_EQ(info.gpus(0).experts(), info.experts_size());
  // The same in the service's metrics.
  const std::string text = s.gpu.registry->Serialize();
  EXPECT_NE(text.find(absl::StrCat("moemesh_expert_gpu_experts{gpu=\"0\"} ", info.experts_size())),
            std::string::npos)
      << text;
  EXPECT_NE(text.find("moemesh_expert_gpu_local_moves 0"), std::string::npos) << text;
}

// All the GPUs here (up to 8), experts spread over them: the same answers, each GPU holding
// its share.
TEST(GpuExpertsTest, SeveralGpusShareTheExpertsAndAnswerTheSame) {
  const int n = std::min(cuda_testing::PluginGpuCount(), 8);
  if (n < 2) GTEST_SKIP() << "fewer than two CUDA devices";
  std::vector<int> gpus(n);
  std::iota(gpus.begin(), gpus.end(), 0);
  for (ModelFamily family : {ModelFamily::kMixtral, ModelFamily::kGptOss}) {
    SCOPED_TRACE(FamilyName(family));
    CpuAndGpu s;
    const absl::Status started = s.Start(family, gpus);
    ASSERT_TRUE(started.ok()) << started;
    std::mt19937 rng(5);
    v1::ComputeRequest req;
    req.set_layer(s.layer);
    req.set_output_dtype(v1::DATA_TYPE_F32);
    for (int32_t e = 0; e < 8; ++e)
      ASSERT_TRUE(AddRandomRows(&req, e, 3 + 9 * e, s.hidden, DType::kBF16, rng).ok());
    s.ExpectSameAnswers(req);
    grpc::ClientContext ctx;
    v1::InfoResponse info;
    ASSERT_TRUE(s.gpu.stub->Info(&ctx, v1::InfoRequest(), &info).ok());
    ASSERT_EQ(info.gpus_size(), n);
    int64_t experts = 0;
    for (const v1::GpuMemory& g : info.gpus()) {
      EXPECT_GT(g.experts(), 0) << "GPU " << g.device();
      experts += g.experts();
    }
    EXPECT_EQ(experts, info.experts_size());
  }
}

// Load piled on two experts of one GPU: a balancing round moves experts between the GPUs
// (their weights over NCCL) so that the two end up apart, and the answers do not change.
TEST(GpuExpertsTest, RebalancingMovesHotExpertsApartOverNccl) {
  if (cuda_testing::PluginGpuCount() < 2) GTEST_SKIP() << "fewer than two CUDA devices";
  const std::string dir = Generate(ModelFamily::kMixtral);
  absl::StatusOr<std::unique_ptr<ExpertStore>> store = ExpertStore::Open(dir);
  ASSERT_TRUE(store.ok()) << store.status();
  const MoeModelConfig& config = (*store)->config();
  absl::StatusOr<std::vector<ExpertKey>> all = ParseExpertSpec("all", config);
  ASSERT_TRUE(all.ok());
  ASSERT_TRUE((*store)->Load(*all).ok());
  GpuExpertsOptions options;
  options.devices = {0, 1};
  options.rebalance_interval = std::chrono::milliseconds(0);  // this test's rounds only
  absl::StatusOr<std::unique_ptr<GpuExperts>> gpu = GpuExperts::Create(config, options);
  ASSERT_TRUE(gpu.ok()) << gpu.status();
  ASSERT_TRUE((*gpu)->Sync(**store).ok());
  const int64_t layer = config.MoeLayers().back(), H = config.hidden_size;
  std::map<int32_t, int> where = (*gpu)->Placement(layer);
  ASSERT_EQ(where.size(), 8u);
  // Two experts on the same GPU.
  int32_t a = -1, b = -1;
  for (const auto& [e, rank] : where) {
    if (rank != where.begin()->second) continue;
    (a < 0 ? a : b) = e;
    if (b >= 0) break;
  }
  ASSERT_GE(b, 0);
  std::mt19937 rng(3);
  std::normal_distribution<float> nd;
  std::vector<float> x(64 * H);
  for (float& v : x) v = nd(rng);
  auto compute = [&] {
    std::vector<float> y(2 * 64 * H);
    const GpuBatch batches[] = {{a, x.data(), DType::kF32, 64}, {b, x.data(), DType::kF32, 64}};
    const absl::Status s = (*gpu)->Compute(layer, batches, y.data());
    EXPECT_TRUE(s.ok()) << s;
    return y;
  };
  std::vector<float> before;
  for (int i = 0; i < 20; ++i) before = compute();
  absl::StatusOr<int64_t> moved = (*gpu)->Rebalance();
  ASSERT_TRUE(moved.ok()) << moved.status();
  EXPECT_GT(*moved, 0);
  EXPECT_EQ((*gpu)->moves(), *moved);
  where = (*gpu)->Placement(layer);
  EXPECT_NE(where[a], where[b]);
  EXPECT_EQ(where.size(), 8u);
  // Same kernels, same weights (copied byte for byte): the same answers.
  EXPECT_EQ(compute(), before);
  const std::vector<GpuDeviceMemory> memory = (*gpu)->Memory();
  ASSERT_EQ(memory.size(), 2u);
  EXPECT_EQ(memory[0].experts, memory[1].experts) << "swaps keep the even spread";
}

// Concurrent calls for one layer are batched into shared launches (GpuExperts' group
// commit): every caller still gets its own rows' results.
TEST(GpuExpertsTest, ConcurrentCallsGetTheirOwnResults) {
  SKIP_WITHOUT_PLUGIN_GPU();
  CpuAndGpu s;
  const absl::Status started = s.Start(ModelFamily::kMixtral);
  ASSERT_TRUE(started.ok()) << started;
  const int64_t H = s.hidden, layer = s.layer;
  constexpr int kThreads = 6, kCalls = 20;
  std::atomic<int> wrong{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      std::mt19937 rng(100 + t);
      for (int i = 0; i < kCalls; ++i) {
        v1::ComputeRequest req;
        req.set_layer(layer);
        req.set_output_dtype(v1::DATA_TYPE_F32);
        for (int32_t e : {t % 8, (t + 3) % 8}) {
          if (!AddRandomRows(&req, e, 1 + (i * 7 + t) % 40, H, DType::kBF16, rng).ok()) ++wrong;
        }
        v1::ComputeResponse want, got;
        if (!s.cpu.Compute(req, &want).ok() || !s.gpu.Compute(req, &got).ok() ||
            got.outputs_size() != want.outputs_size()) {
          ++wrong;
          continue;
        }
        for (int o = 0; o < want.outputs_size(); ++o) {
          if (!(OutputRelErr(got.outputs(o), want.outputs(o)) <= 1e-2)) ++wrong;
        }
      }
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(wrong.load(), 0);
}

INSTANTIATE_TEST_SUITE_P(Families, GpuFamilyTest, ::testing::ValuesIn(kAllFamilies),
                         [](const auto& info) { return std::string(FamilyName(info.param)); });

}  // namespace
}  // namespace moemesh
