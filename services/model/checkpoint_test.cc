#include "services/model/checkpoint.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <limits>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "services/model/model_config.h"
#include "services/model/moe_weights.h"
#include "services/model/safetensors.h"

namespace moemesh {
namespace {

namespace fs = std::filesystem;
using Json = nlohmann::json;
using Named = std::vector<std::pair<std::string, Tensor>>;
using ::testing::ElementsAre;
using ::testing::HasSubstr;

// Tests run from the repository root.
const fs::path kFixtures = "tests/fixtures";

// Reference decoders written from the formats' definitions, independent of dtype.cc.
float ManualF16(uint16_t h) {
  const int exp = (h >> 10) & 0x1f;
  const int mant = h & 0x3ff;
  float mag;
  if (exp == 0) {
    mag = std::ldexp(static_cast<float>(mant), -24);
  } else if (exp == 31) {
    mag = mant == 0 ? std::numeric_limits<float>::infinity() : std::nanf("");
  } else {
    mag = std::ldexp(static_cast<float>(mant + 1024), exp - 25);
  }
  return (h & 0x8000) ? -mag : mag;
}

float ManualBf16(uint16_t h) {
  const uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

void WriteText(const fs::path& path, const std::string& text) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out << text;
  ASSERT_TRUE(out.good()) << path;
}

Json ReadJson(const fs::path& path) {
  std::ifstream in(path);
  return Json::parse(in);
}

std::unique_ptr<Checkpoint> OpenOrDie(const fs::path& dir) {
  absl::StatusOr<std::unique_ptr<Checkpoint>> ckpt = Checkpoint::Open(dir.string());
  EXPECT_TRUE(ckpt.ok()) << ckpt.status();
  return ckpt.ok() ? std::move(*ckpt) : nullptr;
}

MoeModelConfig ConfigOrDie(const Checkpoint& ckpt) {
  absl::StatusOr<MoeModelConfig> c = ParseMoeModelConfig(ckpt.config());
  EXPECT_TRUE(c.ok()) << c.status();
  return c.ok() ? *c : MoeModelConfig();
}

// Expects `status` to be `code` with a message containing every fragment.
void ExpectError(const absl::Status& status, absl::StatusCode code,
                 const std::vector<std::string>& fragments) {
  ASSERT_FALSE(status.ok());
  EXPECT_EQ(status.code(), code) << status;
  for (const std::string& f : fragments) EXPECT_THAT(status.message(), HasSubstr(f));
}

class CheckpointTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    dir_ = fs::path(::testing::TempDir()) / "checkpoint_test" / info->name();
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }

  // A writable copy of a committed fixture.
  fs::path CopyFixture(const std::string& name) {
    const fs::path dst = dir_ / name;
    fs::copy(kFixtures / name, dst, fs::copy_options::recursive);
    return dst;
  }

  // Rewrites dir/model.safetensors after `edit` has changed its (name, tensor) list.
  static void EditModel(const fs::path& dir, const std::function<void(Named&)>& edit) {
    const std::string path = (dir / "model.safetensors").string();
    absl::StatusOr<std::unique_ptr<SafetensorsFile>> file = SafetensorsFile::Open(path);
    ASSERT_TRUE(file.ok()) << file.status();
    Named tensors;
    for (const SafetensorsEntry& e : (*file)->header().tensors) {
      tensors.emplace_back(e.name, (*file)->View(e));
    }
    edit(tensors);
    // The views keep the old mapping alive while the new file replaces it.
    ASSERT_TRUE(WriteSafetensors(path, tensors, (*file)->header().metadata).ok());
  }

  static void Remove(Named& tensors, const std::string& name) {
    const size_t before = tensors.size();
    std::erase_if(tensors, [&](const auto& t) { return t.first == name; });
    ASSERT_EQ(tensors.size(), before - 1) << name;
  }

  static void Replace(Named& tensors, const std::string& name, Tensor t) {
    for (auto& [n, old] : tensors) {
      if (n == name) {
        old = std::move(t);
        return;
      }
    }
    FAIL() << "no tensor " << name;
  }

  // A checkpoint folder with the mixtral fixture's config and the given tensors.
  fs::path MakeCheckpoint(const std::string& name, const Named& tensors) {
    const fs::path dst = dir_ / name;
    fs::create_directories(dst);
    fs::copy_file(kFixtures / "mixtral" / "config.json", dst / "config.json");
    EXPECT_TRUE(WriteSafetensors((dst / "model.safetensors").string(), tensors).ok());
    return dst;
  }

  fs::path dir_;
};

class FixtureCheckpointTest : public ::testing::TestWithParam<const char*> {};

TEST_P(FixtureCheckpointTest, OpensAndLoadsEveryMoeLayer) {
  const fs::path dir = kFixtures / GetParam();
  std::unique_ptr<Checkpoint> ckpt = OpenOrDie(dir);
  ASSERT_NE(ckpt, nullptr);
  EXPECT_EQ(ckpt->dir(), dir.string());
  EXPECT_EQ(ckpt->config().at("model_type"), ReadJson(dir / "config.json").at("model_type"));
  const std::vector<std::string> names = ckpt->TensorNames();
  ASSERT_FALSE(names.empty());
  for (const std::string& name : names) {
    ASSERT_TRUE(ckpt->Has(name)) << name;
    EXPECT_THAT(ckpt->FileOf(name), HasSubstr(dir.string())) << name;
    absl::StatusOr<Tensor> t = ckpt->Get(name);
    ASSERT_TRUE(t.ok()) << t.status();
    EXPECT_GT(t->numel(), 0) << name;
  }

  const MoeModelConfig c = ConfigOrDie(*ckpt);
  const int64_t E = c.num_experts, H = c.hidden_size, I = c.expert_intermediate;
  ASSERT_FALSE(c.MoeLayers().empty());
  for (int64_t layer : c.MoeLayers()) {
    SCOPED_TRACE(layer);
    absl::StatusOr<GateWeights> gate = LoadGate(*ckpt, c, layer);
    ASSERT_TRUE(gate.ok()) << gate.status();
    EXPECT_THAT(gate->weight.shape(), ElementsAre(E, H));
    EXPECT_EQ(gate->weight.dtype(), DType::kF32);
    EXPECT_EQ(gate->bias.defined(), c.family == ModelFamily::kGptOss);
    EXPECT_EQ(gate->correction_bias.defined(), c.family == ModelFamily::kDeepseekV3);
    for (int64_t expert = 0; expert < E; ++expert) {
      absl::StatusOr<ExpertWeights> w = LoadExpert(*ckpt, c, layer, expert);
      ASSERT_TRUE(w.ok()) << w.status();
      EXPECT_THAT(w->gate_up.shape(), ElementsAre(2 * I, H));
      EXPECT_THAT(w->down.shape(), ElementsAre(H, I));
      // What the controller counts for moving one (ExpertBytes) is what a service holds.
      EXPECT_EQ(w->bytes(), ExpertBytes(c));
    }
    absl::StatusOr<std::optional<SharedExpertWeights>> shared = LoadSharedExperts(*ckpt, c, layer);
    ASSERT_TRUE(shared.ok()) << shared.status();
    ASSERT_EQ(shared->has_value(), c.shared_intermediate > 0);
    if (shared->has_value()) {
      EXPECT_THAT((*shared)->ffn.down.shape(), ElementsAre(H, c.shared_intermediate));
      EXPECT_EQ((*shared)->gate.defined(), c.shared_expert_gated);
    }
  }
}

INSTANTIATE_TEST_SUITE_P(All, FixtureCheckpointTest,
                         ::testing::Values("mixtral", "mixtral_bf16", "qwen2_moe", "qwen3_moe",
                                           "qwen3_moe_sharded", "deepseek_v2", "deepseek_v3",
                                           "gpt_oss", "deepseek_v3_fp8", "gpt_oss_mxfp4",
                                           "mixtral_fused", "deepseek_v3_fused"));

TEST(ShardedCheckpointTest, FindsTensorsInEveryShard) {
  const fs::path dir = kFixtures / "qwen3_moe_sharded";
  std::unique_ptr<Checkpoint> ckpt = OpenOrDie(dir);
  ASSERT_NE(ckpt, nullptr);
  const Json weight_map = ReadJson(dir / "model.safetensors.index.json").at("weight_map");
  EXPECT_EQ(ckpt->TensorNames().size(), weight_map.size());
  int in_second = 0;
  for (const auto& [name, shard] : weight_map.items()) {
    EXPECT_EQ(ckpt->FileOf(name), (dir / shard.get<std::string>()).string()) << name;
    in_second += shard == "model-00002-of-00002.safetensors";
  }
  EXPECT_GT(in_second, 0);
  EXPECT_LT(in_second, static_cast<int>(weight_map.size()));
  // Layer 0's expert 7 is split across the shards.
  EXPECT_THAT(ckpt->FileOf("model.layers.0.mlp.experts.7.down_proj.weight"),
              HasSubstr("model-00002-of-00002.safetensors"));
  EXPECT_THAT(ckpt->FileOf("model.layers.0.mlp.experts.7.up_proj.weight"),
              HasSubstr("model-00001-of-00002.safetensors"));
}

TEST(CheckpointConversionTest, F16ConvertsExactly) {
  std::unique_ptr<Checkpoint> ckpt = OpenOrDie(kFixtures / "qwen3_moe");
  ASSERT_NE(ckpt, nullptr);
  const std::string name = "model.layers.1.mlp.experts.5.gate_proj.weight";
  absl::StatusOr<Tensor> raw = ckpt->Get(name);
  ASSERT_TRUE(raw.ok()) << raw.status();
  ASSERT_EQ(raw->dtype(), DType::kF16);
  absl::StatusOr<Tensor> f32 = ckpt->GetF32(name, {16, 64});
  ASSERT_TRUE(f32.ok()) << f32.status();
  ASSERT_EQ(f32->dtype(), DType::kF32);
  const auto* bits = raw->data<uint16_t>();
  for (int64_t i = 0; i < raw->numel(); ++i) {
    ASSERT_EQ(f32->data<float>()[i], ManualF16(bits[i])) << i;
  }
  // LoadExpert stacks the same values into the gate rows of gate_up.
  const MoeModelConfig c = ConfigOrDie(*ckpt);
  absl::StatusOr<ExpertWeights> w = LoadExpert(*ckpt, c, 1, 5);
  ASSERT_TRUE(w.ok()) << w.status();
  EXPECT_EQ(std::memcmp(w->gate_up.raw(), f32->raw(), f32->nbytes()), 0);
}

TEST(CheckpointConversionTest, Bf16ConvertsExactly) {
  std::unique_ptr<Checkpoint> ckpt = OpenOrDie(kFixtures / "mixtral_bf16");
  ASSERT_NE(ckpt, nullptr);
  const std::string name = "model.layers.0.block_sparse_moe.experts.6.w2.weight";
  absl::StatusOr<Tensor> raw = ckpt->Get(name);
  ASSERT_TRUE(raw.ok()) << raw.status();
  ASSERT_EQ(raw->dtype(), DType::kBF16);
  absl::StatusOr<Tensor> f32 = ckpt->GetF32(name, {64, 16});
  ASSERT_TRUE(f32.ok()) << f32.status();
  const auto* bits = raw->data<uint16_t>();
  for (int64_t i = 0; i < raw->numel(); ++i) {
    ASSERT_EQ(f32->data<float>()[i], ManualBf16(bits[i])) << i;
  }
  const MoeModelConfig c = ConfigOrDie(*ckpt);
  absl::StatusOr<ExpertWeights> w = LoadExpert(*ckpt, c, 0, 6);
  ASSERT_TRUE(w.ok()) << w.status();
  EXPECT_EQ(std::memcmp(w->down.raw(), f32->raw(), f32->nbytes()), 0);
}

TEST(CheckpointConversionTest, F32IsReturnedUnchanged) {
  std::unique_ptr<Checkpoint> ckpt = OpenOrDie(kFixtures / "mixtral");
  ASSERT_NE(ckpt, nullptr);
  const std::string name = "model.layers.1.block_sparse_moe.gate.weight";
  absl::StatusOr<Tensor> raw = ckpt->Get(name, {8, 64});
  ASSERT_TRUE(raw.ok()) << raw.status();
  absl::StatusOr<Tensor> f32 = ckpt->GetF32(name, {8, 64});
  ASSERT_TRUE(f32.ok()) << f32.status();
  EXPECT_EQ(std::memcmp(raw->raw(), f32->raw(), raw->nbytes()), 0);
}

TEST_F(CheckpointTest, MissingDirectory) {
  const std::string dir = (dir_ / "nope").string();
  ExpectError(Checkpoint::Open(dir).status(), absl::StatusCode::kNotFound, {dir});
}

TEST_F(CheckpointTest, DirectoryIsAFile) {
  const fs::path file = dir_ / "file";
  WriteText(file, "{}");
  ExpectError(Checkpoint::Open(file.string()).status(), absl::StatusCode::kNotFound,
              {file.string(), "not a checkpoint directory"});
}

TEST_F(CheckpointTest, MissingConfig) {
  const fs::path dir = CopyFixture("mixtral");
  fs::remove(dir / "config.json");
  ExpectError(Checkpoint::Open(dir.string()).status(), absl::StatusCode::kNotFound,
              {(dir / "config.json").string()});
}

TEST_F(CheckpointTest, ConfigNotJson) {
  const fs::path dir = CopyFixture("mixtral");
  WriteText(dir / "config.json", "{\"model_type\": \"mixtral\",");
  ExpectError(Checkpoint::Open(dir.string()).status(), absl::StatusCode::kInvalidArgument,
              {(dir / "config.json").string(), "not valid JSON"});
}

TEST_F(CheckpointTest, ConfigNotAnObject) {
  const fs::path dir = CopyFixture("mixtral");
  WriteText(dir / "config.json", "[\"mixtral\"]");
  ExpectError(Checkpoint::Open(dir.string()).status(), absl::StatusCode::kInvalidArgument,
              {(dir / "config.json").string(), "not a JSON object"});
}

TEST_F(CheckpointTest, NoWeights) {
  const fs::path dir = CopyFixture("mixtral");
  fs::remove(dir / "model.safetensors");
  ExpectError(Checkpoint::Open(dir.string()).status(), absl::StatusCode::kNotFound,
              {dir.string(), "neither model.safetensors nor model.safetensors.index.json"});
}

TEST_F(CheckpointTest, IndexNotJson) {
  const fs::path dir = CopyFixture("qwen3_moe_sharded");
  const fs::path index = dir / "model.safetensors.index.json";
  WriteText(index, "{\"weight_map\": {");
  ExpectError(Checkpoint::Open(dir.string()).status(), absl::StatusCode::kInvalidArgument,
              {index.string(), "not valid JSON"});
}

TEST_F(CheckpointTest, IndexWithoutWeightMap) {
  const fs::path dir = CopyFixture("qwen3_moe_sharded");
  const fs::path index = dir / "model.safetensors.index.json";
  for (const char* text : {R"({"metadata": {"total_size": 1}})", R"({"weight_map": []})",
                           R"({"weight_map": "model-00001-of-00002.safetensors"})"}) {
    SCOPED_TRACE(text);
    WriteText(index, text);
    ExpectError(Checkpoint::Open(dir.string()).status(), absl::StatusCode::kInvalidArgument,
                {index.string(), "missing weight_map"});
  }
}

TEST_F(CheckpointTest, IndexEntryNotAString) {
  const fs::path dir = CopyFixture("qwen3_moe_sharded");
  const fs::path index = dir / "model.safetensors.index.json";
  WriteText(index, R"({"weight_map": {"model.embed_tokens.weight": 1}})");
  ExpectError(Checkpoint::Open(dir.string()).status(), absl::StatusCode::kInvalidArgument,
              {index.string(), "'model.embed_tokens.weight'", "not a file name"});
}

TEST_F(CheckpointTest, IndexNamesAMissingShard) {
  const fs::path dir = CopyFixture("qwen3_moe_sharded");
  fs::remove(dir / "model-00002-of-00002.safetensors");
  ExpectError(Checkpoint::Open(dir.string()).status(), absl::StatusCode::kNotFound,
              {(dir / "model-00002-of-00002.safetensors").string()});
}

TEST_F(CheckpointTest, IndexPointsAtAShardWithoutTheTensor) {
  const fs::path dir = CopyFixture("qwen3_moe_sharded");
  const fs::path index = dir / "model.safetensors.index.json";
  const std::string name = "model.layers.0.mlp.experts.7.down_proj.weight";
  Json json = ReadJson(index);
  ASSERT_EQ(json["weight_map"][name], "model-00002-of-00002.safetensors");
  json["weight_map"][name] = "model-00001-of-00002.safetensors";
  WriteText(index, json.dump());
  ExpectError(
      Checkpoint::Open(dir.string()).status(), absl::StatusCode::kNotFound,
      {index.string(), "'" + name + "'", (dir / "model-00001-of-00002.safetensors").string()});
}

TEST_F(CheckpointTest, IndexNamesATensorNoShardHolds) {
  const fs::path dir = CopyFixture("qwen3_moe_sharded");
  const fs::path index = dir / "model.safetensors.index.json";
  Json json = ReadJson(index);
  json["weight_map"]["lm_head.weight"] = "model-00002-of-00002.safetensors";
  WriteText(index, json.dump());
  ExpectError(Checkpoint::Open(dir.string()).status(), absl::StatusCode::kNotFound,
              {"'lm_head.weight'", "does not contain it"});
}

TEST_F(CheckpointTest, ShardNamesThatEscapeTheFolderAreRejected) {
  // A valid shard one level up: only the name check stops "../" from loading it.
  const fs::path dir = CopyFixture("qwen3_moe_sharded");
  fs::copy_file(dir / "model-00001-of-00002.safetensors", dir_ / "model.safetensors");
  const fs::path index = dir / "model.safetensors.index.json";
  const std::string abs_shard = (dir / "model-00001-of-00002.safetensors").string();
  for (const std::string& shard :
       {std::string("../model.safetensors"), std::string(".."), std::string("."), std::string(""),
        abs_shard, std::string("sub/../model-00001-of-00002.safetensors")}) {
    SCOPED_TRACE(shard);
    Json json = ReadJson(index);
    json["weight_map"]["model.embed_tokens.weight"] = shard;
    WriteText(index, json.dump());
    ExpectError(Checkpoint::Open(dir.string()).status(), absl::StatusCode::kInvalidArgument,
                {index.string(), "'model.embed_tokens.weight'", "invalid shard '" + shard + "'"});
  }
}

TEST_F(CheckpointTest, TruncatedShard) {
  const fs::path dir = CopyFixture("mixtral");
  const fs::path model = dir / "model.safetensors";
  const uintmax_t size = fs::file_size(model);
  // Into the data, into the header, into the length prefix.
  struct Case {
    uintmax_t size;
    const char* fragment;
  };
  for (Case c : {Case{size - 1, "tensor '"}, Case{size / 2, "fall outside the data section"},
                 Case{100, "runs past the end of the file"}, Case{4, "shorter than the 8-byte"},
                 Case{0, "shorter than the 8-byte"}}) {
    SCOPED_TRACE(c.size);
    fs::resize_file(model, c.size);
    ExpectError(Checkpoint::Open(dir.string()).status(), absl::StatusCode::kInvalidArgument,
                {model.string(), c.fragment});
  }
}

TEST_F(CheckpointTest, TruncatedSecondShard) {
  const fs::path dir = CopyFixture("qwen3_moe_sharded");
  const fs::path shard = dir / "model-00002-of-00002.safetensors";
  fs::resize_file(shard, fs::file_size(shard) - 4);
  ExpectError(Checkpoint::Open(dir.string()).status(), absl::StatusCode::kInvalidArgument,
              {shard.string(), "tensor '"});
}

TEST_F(CheckpointTest, GetWithTheWrongShapeNamesFileTensorAndShapes) {
  std::unique_ptr<Checkpoint> ckpt = OpenOrDie(kFixtures / "mixtral");
  ASSERT_NE(ckpt, nullptr);
  const std::string name = "model.layers.0.block_sparse_moe.gate.weight";
  const std::vector<std::string> fragments = {
      (kFixtures / "mixtral" / "model.safetensors").string(), "'" + name + "'", "[8, 64]",
      "[64, 8]"};
  ExpectError(ckpt->Get(name, {64, 8}).status(), absl::StatusCode::kInvalidArgument, fragments);
  ExpectError(ckpt->GetF32(name, {64, 8}).status(), absl::StatusCode::kInvalidArgument, fragments);
  ExpectError(ckpt->Get(name, {8, 64, 1}).status(), absl::StatusCode::kInvalidArgument,
              {"[8, 64, 1]"});
}

TEST_F(CheckpointTest, GetOfAMissingTensorIsNotFound) {
  std::unique_ptr<Checkpoint> ckpt = OpenOrDie(kFixtures / "mixtral");
  ASSERT_NE(ckpt, nullptr);
  EXPECT_FALSE(ckpt->Has("lm_head.weight"));
  EXPECT_EQ(ckpt->FileOf("lm_head.weight"), "");
  const std::vector<std::string> fragments = {(kFixtures / "mixtral").string(), "'lm_head.weight'"};
  ExpectError(ckpt->Get("lm_head.weight").status(), absl::StatusCode::kNotFound, fragments);
  ExpectError(ckpt->Get("lm_head.weight", {32, 64}).status(), absl::StatusCode::kNotFound,
              fragments);
  ExpectError(ckpt->GetF32("lm_head.weight", {32, 64}).status(), absl::StatusCode::kNotFound,
              fragments);
}

TEST_F(CheckpointTest, GetF32OfANonFloatTensorNamesTheDType) {
  const fs::path dir = MakeCheckpoint("ints", {{"ids", Tensor::Zeros(DType::kI32, {4})},
                                               {"mask", Tensor::Zeros(DType::kBool, {2, 2})},
                                               {"wide", Tensor::Zeros(DType::kF64, {2})}});
  std::unique_ptr<Checkpoint> ckpt = OpenOrDie(dir);
  ASSERT_NE(ckpt, nullptr);
  const std::string file = (dir / "model.safetensors").string();
  ExpectError(ckpt->GetF32("ids", {4}).status(), absl::StatusCode::kInvalidArgument,
              {file, "'ids'", "I32"});
  ExpectError(ckpt->GetF32("mask", {2, 2}).status(), absl::StatusCode::kInvalidArgument,
              {"'mask'", "BOOL"});
  ExpectError(ckpt->GetF32("wide", {2}).status(), absl::StatusCode::kInvalidArgument,
              {"'wide'", "F64"});
  // The raw view is still available in its own dtype.
  absl::StatusOr<Tensor> ids = ckpt->Get("ids", {4});
  ASSERT_TRUE(ids.ok()) << ids.status();
  EXPECT_EQ(ids->dtype(), DType::kI32);
}

// Quantized releases: what the loader reads back equals the formats' definitions, and
// every damaged or missing part is named.
TEST(QuantizedCheckpointTest, Fp8WeightsAreScaledPerBlock) {
  std::unique_ptr<Checkpoint> ckpt = OpenOrDie(kFixtures / "deepseek_v3_fp8");
  ASSERT_NE(ckpt, nullptr);
  // down_proj [64, 16] in 16 x 24 blocks: scale grid [4, 1], one partial column block.
  const std::string name = "model.layers.2.mlp.experts.11.down_proj.weight";
  const Tensor raw = ckpt->Get(name).value();
  const Tensor scale = ckpt->Get(name + "_scale_inv", {4, 1}).value();
  ASSERT_EQ(raw.dtype(), DType::kF8E4M3);
  absl::StatusOr<Tensor> f32 = ckpt->GetF32(name, {64, 16});
  ASSERT_TRUE(f32.ok()) << f32.status();
  for (int64_t r = 0; r < 64; ++r) {
    for (int64_t c = 0; c < 16; ++c) {
      // e4m3fn from its definition: bias 7, subnormals below exponent 1.
      const uint8_t b = raw.data<uint8_t>()[r * 16 + c];
      const int e = (b >> 3) & 0xf, m = b & 7;
      const float mag = e == 0 ? std::ldexp(float(m), -9) : std::ldexp(float(8 + m), e - 10);
      const float want = ((b & 0x80) ? -mag : mag) * scale.data<float>()[r / 16];
      ASSERT_EQ(f32->data<float>()[r * 16 + c], want) << r << "," << c;
    }
  }
}

TEST(QuantizedCheckpointTest, Mxfp4UnpacksLowNibbleFirst) {
  std::unique_ptr<Checkpoint> ckpt = OpenOrDie(kFixtures / "gpt_oss_mxfp4");
  ASSERT_NE(ckpt, nullptr);
  const std::string stem = "model.layers.1.mlp.experts.down_proj";
  const Tensor blocks = ckpt->Get(stem + "_blocks", {8, 64, 1, 16}).value();
  const Tensor scales = ckpt->Get(stem + "_scales", {8, 64, 1}).value();
  absl::StatusOr<Tensor> down = ckpt->GetMxfp4(stem, 5, {8, 64, 32});
  ASSERT_TRUE(down.ok()) << down.status();
  const float fp4[8] = {0, 0.5f, 1, 1.5f, 2, 3, 4, 6};
  for (int64_t r = 0; r < 64; ++r) {
    for (int64_t c = 0; c < 32; ++c) {
      const uint8_t byte = blocks.data<uint8_t>()[(5 * 64 + r) * 16 + c / 2];
      const uint8_t code = c % 2 == 0 ? byte & 0xf : byte >> 4;
      const float want = std::ldexp((code & 8) ? -fp4[code & 7] : fp4[code & 7],
                                    scales.data<uint8_t>()[5 * 64 + r] - 127);
      ASSERT_EQ(down->data<float>()[r * 32 + c], want) << r << "," << c;
    }
  }
  // LoadExpert's down [H, I] is exactly these rows.
  absl::StatusOr<ExpertWeights> w = LoadExpert(*ckpt, ConfigOrDie(*ckpt), 1, 5);
  ASSERT_TRUE(w.ok()) << w.status();
  EXPECT_EQ(std::memcmp(w->down.raw(), down->raw(), down->nbytes()), 0);
}

TEST_F(CheckpointTest, Fp8WithoutOrWithBadScalesIsNamed) {
  const fs::path dir = CopyFixture("deepseek_v3_fp8");
  const std::string name = "model.layers.1.mlp.experts.3.up_proj.weight";
  EditModel(dir, [&](Named& t) {
    Remove(t, name + "_scale_inv");
    Replace(t, "model.layers.1.mlp.experts.4.up_proj.weight_scale_inv",
            Tensor::Zeros(DType::kF32, {3, 1}));
    Replace(t, "model.layers.1.mlp.experts.5.up_proj.weight_scale_inv",
            Tensor::Zeros(DType::kI32, {1, 3}));
  });
  std::unique_ptr<Checkpoint> ckpt = OpenOrDie(dir);
  ASSERT_NE(ckpt, nullptr);
  ExpectError(ckpt->GetF32(name, {16, 64}).status(), absl::StatusCode::kInvalidArgument,
              {"'" + name + "'", "no block scales", "'" + name + "_scale_inv'"});
  ExpectError(ckpt->GetF32("model.layers.1.mlp.experts.4.up_proj.weight", {16, 64}).status(),
              absl::StatusCode::kInvalidArgument,
              {"experts.4.up_proj.weight_scale_inv'", "[3, 1]", "expected [1, 3]", "16x24 blocks"});
  ExpectError(ckpt->GetF32("model.layers.1.mlp.experts.5.up_proj.weight", {16, 64}).status(),
              absl::StatusCode::kInvalidArgument, {"experts.5.up_proj.weight_scale_inv'", "I32"});
  // The layer load names the expert's missing scales too.
  ExpectError(LoadExpert(*ckpt, ConfigOrDie(*ckpt), 1, 3).status(),
              absl::StatusCode::kInvalidArgument, {name + "_scale_inv"});
}

TEST_F(CheckpointTest, BadWeightBlockSizeIsRejectedAtOpen) {
  for (const char* block : {"[128]", "[0, 128]", "[128, -1]", "\"128x128\"", "[1.5, 2]"}) {
    SCOPED_TRACE(block);
    const fs::path dir = CopyFixture("deepseek_v3_fp8");
    Json config = ReadJson(dir / "config.json");
    config["quantization_config"]["weight_block_size"] = Json::parse(block);
    WriteText(dir / "config.json", config.dump());
    ExpectError(Checkpoint::Open(dir.string()).status(), absl::StatusCode::kInvalidArgument,
                {(dir / "config.json").string(), "weight_block_size"});
    fs::remove_all(dir);
  }
  const fs::path dir = CopyFixture("deepseek_v3_fp8");
  Json config = ReadJson(dir / "config.json");
  config["quantization_config"] = "fp8";
  WriteText(dir / "config.json", config.dump());
  ExpectError(Checkpoint::Open(dir.string()).status(), absl::StatusCode::kInvalidArgument,
              {"quantization_config", "quant_method"});
}

TEST_F(CheckpointTest, DamagedMxfp4IsNamed) {
  const fs::path dir = CopyFixture("gpt_oss_mxfp4");
  const std::string stem = "model.layers.0.mlp.experts.gate_up_proj";
  EditModel(dir, [&](Named& t) {
    Replace(t, stem + "_scales", Tensor::Zeros(DType::kU8, {8, 64, 3}));
    Replace(t, "model.layers.1.mlp.experts.gate_up_proj_blocks",
            Tensor::Zeros(DType::kI8, {8, 64, 2, 16}));
    Remove(t, "model.layers.1.mlp.experts.down_proj_scales");
  });
  std::unique_ptr<Checkpoint> ckpt = OpenOrDie(dir);
  ASSERT_NE(ckpt, nullptr);
  const MoeModelConfig c = ConfigOrDie(*ckpt);
  ExpectError(LoadExpert(*ckpt, c, 0, 0).status(), absl::StatusCode::kInvalidArgument,
              {"'" + stem + "_scales'", "[8, 64, 3]", "expected [8, 64, 2]"});
  ExpectError(LoadExpert(*ckpt, c, 1, 0).status(), absl::StatusCode::kInvalidArgument,
              {"gate_up_proj_blocks'", "I8", "expected U8"});
  ExpectError(ckpt->GetMxfp4("model.layers.1.mlp.experts.down_proj", 0, {8, 64, 32}).status(),
              absl::StatusCode::kNotFound, {"'model.layers.1.mlp.experts.down_proj_scales'"});
  ExpectError(ckpt->GetMxfp4(stem, 0, {8, 64, 48}).status(), absl::StatusCode::kInvalidArgument,
              {"48 columns", "multiple of 32"});
  ExpectError(ckpt->GetMxfp4(stem, 8, {8, 64, 64}).status(), absl::StatusCode::kInvalidArgument,
              {"entry 8"});
}

TEST_F(CheckpointTest, UnsupportedQuantizationIsNamedWhenItsTensorsAreMissing) {
  const fs::path dir = CopyFixture("mixtral");
  Json config = ReadJson(dir / "config.json");
  config["quantization_config"] = {{"quant_method", "awq"}, {"bits", 4}};
  WriteText(dir / "config.json", config.dump());
  EditModel(dir,
            [&](Named& t) { Remove(t, "model.layers.0.block_sparse_moe.experts.2.w1.weight"); });
  std::unique_ptr<Checkpoint> ckpt = OpenOrDie(dir);
  ASSERT_NE(ckpt, nullptr);
  ExpectError(LoadExpert(*ckpt, ConfigOrDie(*ckpt), 0, 2).status(), absl::StatusCode::kNotFound,
              {"'model.layers.0.block_sparse_moe.experts.2.w1.weight'", "quant_method 'awq'"});
  // Its unquantized tensors still load.
  EXPECT_TRUE(LoadExpert(*ckpt, ConfigOrDie(*ckpt), 0, 3).ok());
}

TEST_F(CheckpointTest, IndexTakesPrecedenceOverASingleFile) {
  const fs::path dir = CopyFixture("qwen3_moe_sharded");
  WriteText(dir / "model.safetensors", "not a safetensors file");
  std::unique_ptr<Checkpoint> ckpt = OpenOrDie(dir);
  ASSERT_NE(ckpt, nullptr);
  EXPECT_TRUE(ckpt->Has("model.embed_tokens.weight"));
}

// Loading an MoE layer from a checkpoint one tensor of which was removed or damaged.
class DamagedExpertTest : public CheckpointTest {
 protected:
  static constexpr char kPrefix[] = "model.layers.1.block_sparse_moe";

  static std::string ExpertTensor(int expert, const char* proj) {
    return std::string(kPrefix) + ".experts." + std::to_string(expert) + "." + proj + ".weight";
  }

  // Edits a copy of the mixtral fixture, reopens it and loads layer 1's expert 3.
  absl::Status LoadExpert3After(const std::function<void(Named&)>& edit) {
    const fs::path dir = CopyFixture("mixtral");
    EditModel(dir, edit);
    std::unique_ptr<Checkpoint> ckpt = OpenOrDie(dir);
    if (ckpt == nullptr) return absl::InternalError("open failed");
    const MoeModelConfig c = ConfigOrDie(*ckpt);
    // Neighbours of the damaged expert still load.
    EXPECT_TRUE(LoadExpert(*ckpt, c, 1, 2).ok());
    EXPECT_TRUE(LoadExpert(*ckpt, c, 0, 3).ok());
    return LoadExpert(*ckpt, c, 1, 3).status();
  }
};

TEST_F(DamagedExpertTest, MissingTensorIsNamed) {
  for (const char* proj : {"w1", "w3", "w2"}) {
    SCOPED_TRACE(proj);
    const std::string name = ExpertTensor(3, proj);
    ExpectError(LoadExpert3After([&](Named& t) { Remove(t, name); }), absl::StatusCode::kNotFound,
                {"'" + name + "'"});
    fs::remove_all(dir_ / "mixtral");
  }
}

TEST_F(DamagedExpertTest, WrongDTypeIsNamed) {
  struct Case {
    const char* proj;
    DType dtype;
    std::vector<int64_t> shape;
  };
  for (const Case& c : {Case{"w1", DType::kI32, {16, 64}}, Case{"w3", DType::kF64, {16, 64}},
                        Case{"w2", DType::kU16, {64, 16}}}) {
    SCOPED_TRACE(c.proj);
    const std::string name = ExpertTensor(3, c.proj);
    ExpectError(
        LoadExpert3After([&](Named& t) { Replace(t, name, Tensor::Zeros(c.dtype, c.shape)); }),
        absl::StatusCode::kInvalidArgument, {"'" + name + "'", DTypeName(c.dtype)});
    fs::remove_all(dir_ / "mixtral");
  }
}

TEST_F(DamagedExpertTest, WrongShapeIsNamed) {
  const std::string name = ExpertTensor(3, "w2");
  ExpectError(LoadExpert3After([&](Named& t) {
                Replace(t, name, Tensor::Zeros(DType::kF32, {16, 64}));
              }),
              absl::StatusCode::kInvalidArgument, {"'" + name + "'", "[16, 64]", "[64, 16]"});
}

TEST_F(CheckpointTest, DamagedGateIsNamed) {
  const std::string name = "model.layers.1.block_sparse_moe.gate.weight";
  for (bool remove : {true, false}) {
    SCOPED_TRACE(remove);
    const fs::path dir = CopyFixture("mixtral");
    EditModel(dir, [&](Named& t) {
      if (remove) {
        Remove(t, name);
      } else {
        Replace(t, name, Tensor::Zeros(DType::kI8, {8, 64}));
      }
    });
    std::unique_ptr<Checkpoint> ckpt = OpenOrDie(dir);
    ASSERT_NE(ckpt, nullptr);
    const MoeModelConfig c = ConfigOrDie(*ckpt);
    EXPECT_TRUE(LoadGate(*ckpt, c, 0).ok());
    ExpectError(LoadGate(*ckpt, c, 1).status(),
                remove ? absl::StatusCode::kNotFound : absl::StatusCode::kInvalidArgument,
                {"'" + name + "'"});
    fs::remove_all(dir);
  }
}

TEST_F(CheckpointTest, MissingCorrectionBiasIsNamed) {
  const std::string name = "model.layers.2.mlp.gate.e_score_correction_bias";
  const fs::path dir = CopyFixture("deepseek_v3");
  EditModel(dir, [&](Named& t) { Remove(t, name); });
  std::unique_ptr<Checkpoint> ckpt = OpenOrDie(dir);
  ASSERT_NE(ckpt, nullptr);
  ExpectError(LoadGate(*ckpt, ConfigOrDie(*ckpt), 2).status(), absl::StatusCode::kNotFound,
              {"'" + name + "'"});
}

TEST_F(CheckpointTest, DamagedSharedExpertIsNamed) {
  const std::string gate = "model.layers.2.mlp.shared_expert_gate.weight";
  const std::string up = "model.layers.2.mlp.shared_expert.up_proj.weight";
  const fs::path dir = CopyFixture("qwen2_moe");
  EditModel(dir, [&](Named& t) {
    Remove(t, gate);
    Replace(t, up, Tensor::Zeros(DType::kF32, {48, 32}));
  });
  std::unique_ptr<Checkpoint> ckpt = OpenOrDie(dir);
  ASSERT_NE(ckpt, nullptr);
  const MoeModelConfig c = ConfigOrDie(*ckpt);
  ExpectError(LoadSharedExperts(*ckpt, c, 2).status(), absl::StatusCode::kInvalidArgument,
              {"'" + up + "'", "[48, 32]", "[48, 64]"});
  EXPECT_TRUE(LoadSharedExperts(*ckpt, c, 1).ok());
  EXPECT_TRUE(LoadGate(*ckpt, c, 2).ok());
}

TEST_F(CheckpointTest, MissingSharedExpertGateIsNamed) {
  const std::string gate = "model.layers.1.mlp.shared_expert_gate.weight";
  const fs::path dir = CopyFixture("qwen2_moe");
  EditModel(dir, [&](Named& t) { Remove(t, gate); });
  std::unique_ptr<Checkpoint> ckpt = OpenOrDie(dir);
  ASSERT_NE(ckpt, nullptr);
  ExpectError(LoadSharedExperts(*ckpt, ConfigOrDie(*ckpt), 1).status(), absl::StatusCode::kNotFound,
              {"'" + gate + "'"});
}

TEST_F(CheckpointTest, DamagedFusedGptOssExpertsAreNamed) {
  const std::string gate_up = "model.layers.0.mlp.experts.gate_up_proj";
  const std::string down = "model.layers.0.mlp.experts.down_proj";
  const fs::path dir = CopyFixture("gpt_oss");
  EditModel(dir, [&](Named& t) {
    Replace(t, gate_up, Tensor::Zeros(DType::kI32, {8, 64, 32}));
    Replace(t, down, Tensor::Zeros(DType::kF32, {8, 64, 16}));
  });
  std::unique_ptr<Checkpoint> ckpt = OpenOrDie(dir);
  ASSERT_NE(ckpt, nullptr);
  const MoeModelConfig c = ConfigOrDie(*ckpt);
  // down_proj's shape is checked before any conversion.
  ExpectError(LoadExpert(*ckpt, c, 0, 1).status(), absl::StatusCode::kInvalidArgument,
              {"'" + down + "'", "[8, 64, 16]", "[8, 16, 64]"});
  EXPECT_TRUE(LoadExpert(*ckpt, c, 1, 1).ok());

  const fs::path dir2 = dir_ / "gpt_oss_2";
  fs::copy(kFixtures / "gpt_oss", dir2, fs::copy_options::recursive);
  EditModel(dir2, [&](Named& t) { Replace(t, gate_up, Tensor::Zeros(DType::kI32, {8, 64, 32})); });
  std::unique_ptr<Checkpoint> ckpt2 = OpenOrDie(dir2);
  ASSERT_NE(ckpt2, nullptr);
  ExpectError(LoadExpert(*ckpt2, c, 0, 1).status(), absl::StatusCode::kInvalidArgument,
              {"'" + gate_up + "'", "I32"});
}

TEST_F(CheckpointTest, DamagedFusedSwiGluExpertsAreNamed) {
  // transformers 5's run-time layout: experts.gate_up_proj [E, 2I, H], experts.down_proj [E, H, I].
  const std::string gate_up = "model.layers.0.mlp.experts.gate_up_proj";
  const std::string down = "model.layers.1.mlp.experts.down_proj";
  const fs::path dir = CopyFixture("mixtral_fused");
  EditModel(dir, [&](Named& t) {
    Replace(t, gate_up, Tensor::Zeros(DType::kBF16, {8, 64, 32}));
    Replace(t, down, Tensor::Zeros(DType::kI16, {8, 64, 16}));
  });
  std::unique_ptr<Checkpoint> ckpt = OpenOrDie(dir);
  ASSERT_NE(ckpt, nullptr);
  const MoeModelConfig c = ConfigOrDie(*ckpt);
  ExpectError(LoadExpert(*ckpt, c, 0, 2).status(), absl::StatusCode::kInvalidArgument,
              {"'" + gate_up + "'", "[8, 64, 32]", "expected [8, 32, 64]"});
  ExpectError(LoadExpert(*ckpt, c, 1, 2).status(), absl::StatusCode::kInvalidArgument,
              {"'" + down + "'", "I16"});
  // The gate is found under the renamed block too.
  absl::StatusOr<GateWeights> gate = LoadGate(*ckpt, c, 1);
  ASSERT_TRUE(gate.ok()) << gate.status();
  EXPECT_THAT(gate->weight.shape(), ElementsAre(8, 64));
}

TEST_F(CheckpointTest, LoadingDenseLayersOrMissingExpertsFails) {
  std::unique_ptr<Checkpoint> ckpt = OpenOrDie(kFixtures / "qwen2_moe");
  ASSERT_NE(ckpt, nullptr);
  const MoeModelConfig c = ConfigOrDie(*ckpt);
  ExpectError(LoadGate(*ckpt, c, 0).status(), absl::StatusCode::kInvalidArgument,
              {"layer 0 is a dense layer"});
  ExpectError(LoadExpert(*ckpt, c, 0, 0).status(), absl::StatusCode::kInvalidArgument, {"layer 0"});
  ExpectError(LoadSharedExperts(*ckpt, c, 3).status(), absl::StatusCode::kInvalidArgument,
              {"layer 3 does not exist"});
  for (int64_t expert : {int64_t{-1}, int64_t{8}}) {
    ExpectError(LoadExpert(*ckpt, c, 1, expert).status(), absl::StatusCode::kInvalidArgument,
                {"expert " + std::to_string(expert) + " out of range"});
  }
}

}  // namespace
}  // namespace moemesh
