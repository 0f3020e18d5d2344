// The expert service with --device cuda: the same answers as the CPU service within BF16
// tolerance, for every family, over F32 and BF16 wires; Load/Unload keep the GPU in step;
// Info reports the GPU's memory. Without a GPU (or a CUDA build) the device cases skip
// and --device cuda must fail with an error that says why.
#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>

#include <atomic>
#include <cmath>
#include <filesystem>
#include <random>
#include <thread>

#include "absl/strings/str_cat.h"
#include "expert_service/expert_server.h"
#include "services/model_generator.h"
#include "services/status_macros.h"
#include "services/wire.h"

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
  std::unique_ptr<ExpertServer> server;
  std::unique_ptr<v1::ExpertService::Stub> stub;

  static absl::StatusOr<Service> Start(const std::string& dir, const std::string& device) {
    ExpertServerOptions o;
    o.model_dir = dir;
    o.service_id = device;
    o.device = device;
    ASSIGN_OR_RETURN(std::unique_ptr<Checkpoint> ckpt, Checkpoint::Open(dir));
    ASSIGN_OR_RETURN(MoeModelConfig config, ParseMoeModelConfig(ckpt->config()));
    ASSIGN_OR_RETURN(o.experts, ParseExpertSpec("all", config));
    Service s;
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
  if (GpuExperts::Available()) GTEST_SKIP() << "a GPU is here: the device cases run instead";
  const std::string dir = Generate(ModelFamily::kMixtral);
  auto s = Service::Start(dir, "cuda");
  ASSERT_FALSE(s.ok());
  EXPECT_TRUE(s.status().code() == absl::StatusCode::kFailedPrecondition ||
              s.status().code() == absl::StatusCode::kUnimplemented)
      << s.status();
  EXPECT_NE(s.status().message().find("--device cuda"), std::string::npos) << s.status();
}

double RelErr(const std::vector<float>& got, const std::vector<float>& want) {
  double num = 0, den = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    if (!std::isfinite(got[i])) return INFINITY;
    num += (got[i] - want[i]) * double(got[i] - want[i]);
    den += double(want[i]) * want[i];
  }
  return std::sqrt(num / std::max(den, 1e-30));
}

class GpuFamilyTest : public ::testing::TestWithParam<ModelFamily> {};

TEST_P(GpuFamilyTest, MatchesTheCpuServiceWithinBf16Tolerance) {
  if (!GpuExperts::Available()) GTEST_SKIP() << "no CUDA device";
  const std::string dir = Generate(GetParam());
  auto cpu = Service::Start(dir, "cpu");
  ASSERT_TRUE(cpu.ok()) << cpu.status();
  auto gpu = Service::Start(dir, "cuda");
  ASSERT_TRUE(gpu.ok()) << gpu.status();
  const MoeModelConfig& config = gpu->server->store().config();
  const int64_t H = config.hidden_size, layer = config.MoeLayers().back();
  std::mt19937 rng(GetParam() == ModelFamily::kMixtral ? 1 : 2);
  std::normal_distribution<float> nd;
  for (DType wire : {DType::kF32, DType::kBF16}) {
    SCOPED_TRACE(DTypeName(wire));
    v1::ComputeRequest req;
    req.set_layer(layer);
    req.set_output_dtype(v1::DATA_TYPE_F32);
    // Experts out of order, one empty, sizes across the 64-row tiles.
    const std::vector<std::pair<int32_t, int64_t>> batches = {{5, 33}, {0, 1}, {3, 0}, {7, 130}};
    for (const auto& [e, n] : batches) {
      Tensor x = Tensor::Empty(DType::kF32, {n, H});
      for (int64_t i = 0; i < n * H; ++i) x.mutable_data<float>()[i] = nd(rng);
      v1::ExpertRows* b = req.add_batches();
      b->set_expert(e);
      ASSERT_TRUE(ToProto(x, wire, b->mutable_rows()).ok());
    }
    v1::ComputeResponse want, got;
    ASSERT_TRUE(cpu->Compute(req, &want).ok());
    const absl::Status s = gpu->Compute(req, &got);
    ASSERT_TRUE(s.ok()) << s;
    ASSERT_EQ(got.outputs_size(), want.outputs_size());
    for (int i = 0; i < want.outputs_size(); ++i) {
      EXPECT_EQ(got.outputs(i).expert(), want.outputs(i).expert());
      const Tensor g = FromProto(got.outputs(i).rows(), nullptr, "gpu").value();
      const Tensor w = FromProto(want.outputs(i).rows(), nullptr, "cpu").value();
      ASSERT_EQ(g.shape(), w.shape());
      const std::vector<float> gv(g.data<float>(), g.data<float>() + g.numel());
      const std::vector<float> wv(w.data<float>(), w.data<float>() + w.numel());
      if (wv.empty()) continue;
      EXPECT_LE(RelErr(gv, wv), 1e-2) << "expert " << want.outputs(i).expert();
    }
  }
  // Unloaded on the service, gone from the GPU; Info tells the GPU's memory.
  grpc::ClientContext ctx;
  v1::UnloadExpertsRequest un;
  v1::ExpertId* id = un.add_experts();
  id->set_layer(layer);
  id->set_expert(5);
  v1::UnloadExpertsResponse un_resp;
  ASSERT_TRUE(gpu->stub->UnloadExperts(&ctx, un, &un_resp).ok());
  v1::ComputeRequest again;
  again.set_layer(layer);
  again.set_output_dtype(v1::DATA_TYPE_F32);
  v1::ExpertRows* b = again.add_batches();
  b->set_expert(5);
  ASSERT_TRUE(ToProto(Tensor::Empty(DType::kF32, {1, H}), DType::kF32, b->mutable_rows()).ok());
  v1::ComputeResponse resp;
  EXPECT_EQ(gpu->Compute(again, &resp).code(), absl::StatusCode::kNotFound);
  grpc::ClientContext info_ctx;
  v1::InfoResponse info;
  ASSERT_TRUE(gpu->stub->Info(&info_ctx, v1::InfoRequest(), &info).ok());
  EXPECT_EQ(info.device(), "cuda:0");
  EXPECT_GT(info.gpu_weight_bytes(), 0);
  EXPECT_GT(info.gpu_total_bytes(), info.gpu_weight_bytes());
}

// Concurrent calls for one layer are batched into shared launches (GpuExperts' group
// commit): every caller still gets its own rows' results.
TEST(GpuExpertsTest, ConcurrentCallsGetTheirOwnResults) {
  if (!GpuExperts::Available()) GTEST_SKIP() << "no CUDA device";
  const std::string dir = Generate(ModelFamily::kMixtral);
  auto cpu = Service::Start(dir, "cpu");
  ASSERT_TRUE(cpu.ok()) << cpu.status();
  auto gpu = Service::Start(dir, "cuda");
  ASSERT_TRUE(gpu.ok()) << gpu.status();
  const MoeModelConfig& config = gpu->server->store().config();
  const int64_t H = config.hidden_size, layer = config.MoeLayers().back();
  constexpr int kThreads = 6, kCalls = 20;
  std::atomic<int> wrong{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      std::mt19937 rng(100 + t);
      std::normal_distribution<float> nd;
      for (int i = 0; i < kCalls; ++i) {
        v1::ComputeRequest req;
        req.set_layer(layer);
        req.set_output_dtype(v1::DATA_TYPE_F32);
        for (int32_t e : {t % 8, (t + 3) % 8}) {
          const int64_t n = 1 + (i * 7 + t) % 40;
          Tensor x = Tensor::Empty(DType::kF32, {n, H});
          for (int64_t j = 0; j < n * H; ++j) x.mutable_data<float>()[j] = nd(rng);
          v1::ExpertRows* b = req.add_batches();
          b->set_expert(e);
          if (!ToProto(x, DType::kBF16, b->mutable_rows()).ok()) ++wrong;
        }
        v1::ComputeResponse want, got;
        if (!cpu->Compute(req, &want).ok() || !gpu->Compute(req, &got).ok() ||
            got.outputs_size() != want.outputs_size()) {
          ++wrong;
          continue;
        }
        for (int o = 0; o < want.outputs_size(); ++o) {
          const Tensor g = FromProto(got.outputs(o).rows(), nullptr, "gpu").value();
          const Tensor w = FromProto(want.outputs(o).rows(), nullptr, "cpu").value();
          const std::vector<float> gv(g.data<float>(), g.data<float>() + g.numel());
          const std::vector<float> wv(w.data<float>(), w.data<float>() + w.numel());
          if (gv.size() != wv.size() || RelErr(gv, wv) > 1e-2) ++wrong;
        }
      }
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(wrong.load(), 0);
}

INSTANTIATE_TEST_SUITE_P(Families, GpuFamilyTest,
                         ::testing::Values(ModelFamily::kMixtral, ModelFamily::kQwen2Moe,
                                           ModelFamily::kQwen3Moe, ModelFamily::kDeepseekV2,
                                           ModelFamily::kDeepseekV3, ModelFamily::kGptOss),
                         [](const auto& info) { return std::string(FamilyName(info.param)); });

}  // namespace
}  // namespace moemesh
