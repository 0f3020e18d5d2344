// The mesh end to end: real `moemesh expert` and `moemesh router` processes on
// loopback, driven through KServe v2 ModelInfer, answers compared bit for bit with the
// in-process MoeLayer on the same wire dtype.
#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>
#include <signal.h>

#include <atomic>
#include <cstring>
#include <filesystem>
#include <random>
#include <thread>

#include "absl/strings/str_cat.h"
#include "services/checkpoint.h"
#include "services/model_generator.h"
#include "services/moe_layer.h"
#include "tools/local_mesh.h"

#ifndef MOEMESH_BINARY
#error "MOEMESH_BINARY must name the moemesh executable"
#endif

namespace moemesh {
namespace {

using std::chrono::seconds;

struct Model {
  std::string dir;
  std::unique_ptr<Checkpoint> ckpt;
  MoeModelConfig config;
};

Model Generate(ModelFamily family) {
  GenModelOptions o;
  o.family = family;
  o.hidden = 64;
  o.intermediate = 48;
  o.shared_intermediate = 48;
  o.experts = 8;
  o.top_k = 2;
  o.layers = 2;
  o.num_groups = 2;
  o.topk_groups = 1;
  o.seed = 3;
  Model m;
  m.dir = (std::filesystem::path(::testing::TempDir()) / absl::StrCat("mesh_e2e_", FamilyName(family))).string();
  EXPECT_TRUE(GenerateModel(m.dir, o).ok());
  m.ckpt = Checkpoint::Open(m.dir).value();
  m.config = ParseMoeModelConfig(m.ckpt->config()).value();
  return m;
}

std::unique_ptr<LocalMesh> StartMesh(const Model& m, int services, int replicas, const std::string& wire) {
  LocalMeshOptions o;
  o.moemesh_binary = MOEMESH_BINARY;
  o.model_dir = m.dir;
  o.num_expert_services = services;
  o.replicas = replicas;
  o.wire = wire;
  o.work_dir = ::testing::TempDir();
  auto mesh = LocalMesh::Start(o);
  EXPECT_TRUE(mesh.ok()) << mesh.status();
  if (!mesh.ok()) return nullptr;
  EXPECT_TRUE((*mesh)->WaitReady(seconds(60)).ok());
  return std::move(*mesh);
}

Tensor Input(int64_t T, int64_t H, uint32_t seed, DType dtype = DType::kF32) {
  Tensor x = Tensor::Empty(DType::kF32, {T, H});
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd;
  for (int64_t i = 0; i < x.numel(); ++i) x.mutable_data<float>()[i] = nd(rng);
  return dtype == DType::kF32 ? x : x.FromF32(dtype).value();
}

bool SameBits(const Tensor& a, const Tensor& b) {
  return a.dtype() == b.dtype() && a.shape() == b.shape() &&
         std::memcmp(a.raw(), b.raw(), a.nbytes()) == 0;
}

class MeshFamilyTest : public ::testing::TestWithParam<ModelFamily> {};

TEST_P(MeshFamilyTest, BitIdenticalToMoeLayerOnBothWireDtypes) {
  Model m = Generate(GetParam());
  for (const std::string wire : {"f32", "bf16"}) {
    SCOPED_TRACE(wire);
    auto mesh = StartMesh(m, 3, wire == "f32" ? 1 : 2, wire);
    ASSERT_NE(mesh, nullptr);
    KServeClient client(mesh->router_endpoint());
    MoeLayerOptions lo;
    lo.wire_dtype = wire == "f32" ? DType::kF32 : DType::kBF16;
    for (int64_t layer : m.config.MoeLayers()) {
      auto ref = MoeLayer::Create(*m.ckpt, m.config, layer, lo).value();
      for (DType in_dtype : {DType::kF32, DType::kBF16}) {
        const Tensor x = Input(37, m.config.hidden_size, static_cast<uint32_t>(layer) + 1, in_dtype);
        auto got = client.Infer(x, layer, seconds(30));
        ASSERT_TRUE(got.ok()) << got.status();
        const MoeLayerOutput want = ref->Forward(x).value();
        EXPECT_TRUE(SameBits(got->output, want.output)) << "layer " << layer;
        EXPECT_TRUE(SameBits(got->topk_ids, want.topk_ids));
        EXPECT_TRUE(SameBits(got->topk_weights, want.topk_weights));
      }
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Families, MeshFamilyTest,
                         ::testing::Values(ModelFamily::kMixtral, ModelFamily::kQwen2Moe,
                                           ModelFamily::kQwen3Moe, ModelFamily::kDeepseekV2,
                                           ModelFamily::kDeepseekV3, ModelFamily::kGptOss),
                         [](const auto& info) { return std::string(FamilyName(info.param)); });

TEST(MeshTest, ConcurrentClientsAndBadInputsSideBySide) {
  Model m = Generate(ModelFamily::kQwen3Moe);
  auto mesh = StartMesh(m, 3, 1, "f32");
  ASSERT_NE(mesh, nullptr);
  const int64_t H = m.config.hidden_size;
  auto ref = MoeLayer::Create(*m.ckpt, m.config, 0).value();
  std::atomic<int> good{0}, bad_ok{0};
  std::vector<std::thread> threads;
  for (int c = 0; c < 6; ++c) {
    threads.emplace_back([&, c] {
      KServeClient client(mesh->router_endpoint());
      for (int i = 0; i < 10; ++i) {
        const Tensor x = Input(1 + (c * 7 + i) % 40, H, c * 100 + i);
        auto got = client.Infer(x, 0, seconds(30));
        if (got.ok() && SameBits(got->output, ref->Forward(x).value().output)) ++good;
      }
    });
  }
  // Meanwhile, every kind of bad request gets its code.
  KServeClient client(mesh->router_endpoint());
  struct Bad {
    std::function<void(inference::ModelInferRequest*)> edit;
    grpc::StatusCode code;
    std::string needle;
  };
  auto base = [&](inference::ModelInferRequest* r) {
    r->set_model_name("moe");
    auto* in = r->add_inputs();
    in->set_name("hidden_states");
    in->set_datatype("FP32");
    in->add_shape(2);
    in->add_shape(H);
    r->add_raw_input_contents(std::string(2 * H * 4, '\0'));
  };
  const std::vector<Bad> bads = {
      {[&](auto* r) { r->set_model_name("nope"); }, grpc::StatusCode::NOT_FOUND, "unknown model"},
      {[&](auto* r) { r->mutable_inputs(0)->set_shape(1, H + 1); }, grpc::StatusCode::INVALID_ARGUMENT, "bytes"},
      {[&](auto* r) { r->mutable_inputs(0)->set_datatype("INT32"); }, grpc::StatusCode::INVALID_ARGUMENT, "INT32"},
      {[&](auto* r) { r->mutable_raw_input_contents(0)->resize(7); }, grpc::StatusCode::INVALID_ARGUMENT, "bytes"},
      {[&](auto* r) {
         r->mutable_inputs(0)->set_shape(0, 0);
         r->mutable_raw_input_contents(0)->clear();
       }, grpc::StatusCode::INVALID_ARGUMENT, "T = 0"},
      {[&](auto* r) {
         auto* l = r->add_inputs();
         l->set_name("layer");
         l->set_datatype("INT64");
         l->add_shape(1);
         int64_t v = 17;
         r->add_raw_input_contents(std::string(reinterpret_cast<char*>(&v), 8));
       }, grpc::StatusCode::INVALID_ARGUMENT, "layer 17"},
      {[&](auto* r) { r->mutable_inputs(0)->set_name("x"); }, grpc::StatusCode::INVALID_ARGUMENT, "unknown input"},
      {[&](auto* r) { r->mutable_raw_input_contents(0)->resize(300u << 20); }, grpc::StatusCode::RESOURCE_EXHAUSTED, ""},
  };
  for (const Bad& b : bads) {
    inference::ModelInferRequest req;
    base(&req);
    b.edit(&req);
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + seconds(30));
    inference::ModelInferResponse resp;
    grpc::Status s = client.stub().ModelInfer(&ctx, req, &resp);
    EXPECT_EQ(s.error_code(), b.code) << s.error_message();
    EXPECT_NE(s.error_message().find(b.needle), std::string::npos) << s.error_message();
    if (s.error_code() == b.code) ++bad_ok;
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(good.load(), 60);
  EXPECT_EQ(bad_ok.load(), static_cast<int>(bads.size()));
  // Load statistics saw every routed token.
  auto load = client.ExpertLoad().value();
  int64_t routed = 0;
  for (const auto& l : load.layers()) for (int64_t v : l.tokens()) routed += v;
  EXPECT_GE(routed, 60 * m.config.top_k);
}

TEST(MeshTest, KilledExpertGivesUnavailableOrReplicaAndRecovers) {
  Model m = Generate(ModelFamily::kMixtral);
  const int64_t H = m.config.hidden_size;
  auto ref = MoeLayer::Create(*m.ckpt, m.config, 0).value();
  const Tensor x = Input(64, H, 5);  // 64 tokens reach every expert
  {
    // No replicas: the dead service's experts are UNAVAILABLE, then it comes back.
    auto mesh = StartMesh(m, 3, 1, "f32");
    ASSERT_NE(mesh, nullptr);
    KServeClient client(mesh->router_endpoint());
    ASSERT_TRUE(client.Infer(x, 0, seconds(30)).ok());
    mesh->expert_process(1).Signal(SIGKILL, /*wait=*/true);
    auto down = client.Infer(x, 0, seconds(30));
    ASSERT_FALSE(down.ok());
    EXPECT_EQ(down.status().code(), absl::StatusCode::kUnavailable) << down.status();
    ASSERT_TRUE(mesh->RestartExpert(1).ok());
    bool recovered = false;
    for (int i = 0; i < 50 && !recovered; ++i) {
      auto again = client.Infer(x, 0, seconds(30));
      recovered = again.ok() && SameBits(again->output, ref->Forward(x).value().output);
      if (!recovered) std::this_thread::sleep_for(std::chrono::milliseconds(200));
    }
    EXPECT_TRUE(recovered);
  }
  {
    // Two replicas: killing one service changes nothing the client sees.
    auto mesh = StartMesh(m, 3, 2, "f32");
    ASSERT_NE(mesh, nullptr);
    KServeClient client(mesh->router_endpoint());
    mesh->expert_process(0).Signal(SIGKILL, true);
    for (int i = 0; i < 5; ++i) {
      auto got = client.Infer(x, 0, seconds(30));
      ASSERT_TRUE(got.ok()) << got.status();
      EXPECT_TRUE(SameBits(got->output, ref->Forward(x).value().output));
    }
  }
}

}  // namespace
}  // namespace moemesh
