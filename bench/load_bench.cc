// load_bench: what loading an expert costs in each on-disk format, as a ratio against
// the same expert stored in BF16 (the common release format), in one run.
//
//   load_bench [--dir DIR] [--experts N] [--repeats R]
//
// Writes four one-layer checkpoints of random weights into DIR (default a temporary
// folder, removed at the end) and times LoadExpert for every expert of each, interleaved
// repeat by repeat (files are in the page cache after writing, so this is the conversion
// and packing, not the disk):
//   deepseek_v3 shapes (H=7168, I=2048): BF16 per-expert tensors  vs  block-scaled FP8
//     (F8_E4M3 + weight_scale_inv, 128x128 blocks, as DeepSeek releases V3);
//   gpt_oss shapes (H=2880, I=2880): BF16 fused [E, H, 2I] tensors  vs  MXFP4 _blocks and
//     _scales (as OpenAI releases GPT-OSS).
// Prints one JSON line per pair: median ms per expert and the ratio quantized / BF16.
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "kernels/dtype.h"
#include "nlohmann/json.hpp"
#include "services/base/status_macros.h"
#include "services/model/checkpoint.h"
#include "services/model/model_config.h"
#include "services/model/moe_weights.h"
#include "services/model/safetensors.h"
#include "services/runtime/flags.h"

namespace moemesh {
namespace {

namespace fs = std::filesystem;
using Json = nlohmann::json;
using Named = std::vector<std::pair<std::string, Tensor>>;

std::mt19937 rng(42);

Tensor RandomBf16(std::vector<int64_t> shape, float scale) {
  Tensor t = Tensor::Empty(DType::kBF16, std::move(shape));
  std::normal_distribution<float> nd(0.0f, scale);
  auto* p = t.mutable_data<uint16_t>();
  for (int64_t i = 0; i < t.numel(); ++i) p[i] = F32ToBf16(nd(rng));
  return t;
}

// Random bytes; for F8_E4M3 the NaN codes are avoided.
Tensor RandomBytes(DType dtype, std::vector<int64_t> shape) {
  Tensor t = Tensor::Empty(dtype, std::move(shape));
  auto* p = t.mutable_data<uint8_t>();
  for (int64_t i = 0; i < t.numel(); ++i) {
    uint8_t b = static_cast<uint8_t>(rng());
    if (dtype == DType::kF8E4M3 && (b & 0x7f) == 0x7f) b ^= 1;
    p[i] = b;
  }
  return t;
}

Tensor Filled(std::vector<int64_t> shape, uint8_t value) {
  Tensor t = Tensor::Empty(DType::kU8, std::move(shape));
  std::fill_n(t.mutable_data<uint8_t>(), t.numel(), value);
  return t;
}

absl::Status WriteCheckpoint(const fs::path& dir, const Json& config, const Named& tensors) {
  fs::create_directories(dir);
  std::ofstream(dir / "config.json") << config.dump(2);
  return WriteSafetensors((dir / "model.safetensors").string(), tensors);
}

absl::Status WriteDeepseek(const fs::path& dir, int64_t E, bool fp8) {
  constexpr int64_t H = 7168, I = 2048;
  Json c = {{"model_type", "deepseek_v3"},
            {"hidden_size", H},
            {"num_hidden_layers", 1},
            {"hidden_act", "silu"},
            {"n_routed_experts", E},
            {"num_experts_per_tok", 1},
            {"moe_intermediate_size", I},
            {"n_shared_experts", 0},
            {"n_group", 1},
            {"topk_group", 1},
            {"first_k_dense_replace", 0},
            {"moe_layer_freq", 1},
            {"routed_scaling_factor", 2.5},
            {"norm_topk_prob", true}};
  if (fp8) c["quantization_config"] = {{"quant_method", "fp8"}, {"weight_block_size", {128, 128}}};
  Named t;
  for (int64_t e = 0; e < E; ++e) {
    const std::string p = absl::StrCat("model.layers.0.mlp.experts.", e, ".");
    for (const auto& [name, rows, cols] :
         {std::tuple{"gate_proj", I, H}, std::tuple{"up_proj", I, H},
          std::tuple{"down_proj", H, I}}) {
      const std::string w = absl::StrCat(p, name, ".weight");
      if (!fp8) {
        t.emplace_back(w, RandomBf16({rows, cols}, 0.02f));
        continue;
      }
      t.emplace_back(w, RandomBytes(DType::kF8E4M3, {rows, cols}));
      Tensor s = Tensor::Empty(DType::kF32, {(rows + 127) / 128, (cols + 127) / 128});
      std::fill_n(s.mutable_data<float>(), s.numel(), 1e-4f);
      t.emplace_back(w + "_scale_inv", std::move(s));
    }
  }
  return WriteCheckpoint(dir, c, t);
}

absl::Status WriteGptOss(const fs::path& dir, int64_t E, bool mxfp4) {
  constexpr int64_t H = 2880, I = 2880;
  Json c = {{"model_type", "gpt_oss"}, {"hidden_size", H},       {"num_hidden_layers", 1},
            {"hidden_act", "silu"},    {"num_local_experts", E}, {"num_experts_per_tok", 1},
            {"intermediate_size", I},  {"swiglu_limit", 7.0}};
  const std::string p = "model.layers.0.mlp.experts.";
  Named t;
  if (mxfp4) {
    c["quantization_config"] = {{"quant_method", "mxfp4"}};
    t.emplace_back(p + "gate_up_proj_blocks", RandomBytes(DType::kU8, {E, 2 * I, H / 32, 16}));
    t.emplace_back(p + "gate_up_proj_scales", Filled({E, 2 * I, H / 32}, 120));
    t.emplace_back(p + "down_proj_blocks", RandomBytes(DType::kU8, {E, H, I / 32, 16}));
    t.emplace_back(p + "down_proj_scales", Filled({E, H, I / 32}, 120));
  } else {
    t.emplace_back(p + "gate_up_proj", RandomBf16({E, H, 2 * I}, 0.02f));
    t.emplace_back(p + "down_proj", RandomBf16({E, I, H}, 0.02f));
  }
  t.emplace_back(p + "gate_up_proj_bias", RandomBf16({E, 2 * I}, 0.1f));
  t.emplace_back(p + "down_proj_bias", RandomBf16({E, H}, 0.1f));
  return WriteCheckpoint(dir, c, t);
}

// Milliseconds to load every expert of `dir`'s layer 0, divided by the expert count.
absl::StatusOr<double> MsPerExpert(const fs::path& dir) {
  ASSIGN_OR_RETURN(auto ckpt, Checkpoint::Open(dir.string()));
  ASSIGN_OR_RETURN(MoeModelConfig c, ParseMoeModelConfig(ckpt->config()));
  const auto start = std::chrono::steady_clock::now();
  for (int64_t e = 0; e < c.num_experts; ++e) RETURN_IF_ERROR(LoadExpert(*ckpt, c, 0, e).status());
  const std::chrono::duration<double, std::milli> took = std::chrono::steady_clock::now() - start;
  return took.count() / static_cast<double>(c.num_experts);
}

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

absl::Status Run(const CliArgs& args) {
  ASSIGN_OR_RETURN(const int64_t experts, args.Int("experts", 4));
  ASSIGN_OR_RETURN(const int64_t repeats, args.Int("repeats", 5));
  if (experts < 1 || repeats < 1)
    return absl::InvalidArgumentError("--experts and --repeats must be >= 1");
  const bool own_dir = !args.Has("dir");
  const fs::path root = own_dir
                            ? fs::temp_directory_path() / absl::StrCat("load_bench_", ::getpid())
                            : fs::path(args.String("dir", ""));
  struct Pair {
    const char* name;
    fs::path bf16, quantized;
  };
  const Pair pairs[] = {{"deepseek_v3 fp8 / bf16", root / "ds_bf16", root / "ds_fp8"},
                        {"gpt_oss mxfp4 / bf16", root / "oss_bf16", root / "oss_mxfp4"}};
  RETURN_IF_ERROR(WriteDeepseek(pairs[0].bf16, experts, false));
  RETURN_IF_ERROR(WriteDeepseek(pairs[0].quantized, experts, true));
  RETURN_IF_ERROR(WriteGptOss(pairs[1].bf16, experts, false));
  RETURN_IF_ERROR(WriteGptOss(pairs[1].quantized, experts, true));
  for (const Pair& p : pairs) {
    std::vector<double> bf16, quantized;
    RETURN_IF_ERROR(MsPerExpert(p.bf16).status());  // warm-up
    RETURN_IF_ERROR(MsPerExpert(p.quantized).status());
    for (int64_t r = 0; r < repeats; ++r) {
      ASSIGN_OR_RETURN(double b, MsPerExpert(p.bf16));
      ASSIGN_OR_RETURN(double q, MsPerExpert(p.quantized));
      bf16.push_back(b);
      quantized.push_back(q);
    }
    const double mb = Median(bf16), mq = Median(quantized);
    std::printf(
        "{\"pair\":\"%s\",\"experts\":%lld,\"bf16_ms_per_expert\":%.1f,"
        "\"quantized_ms_per_expert\":%.1f,\"ratio_quantized_bf16\":%.2f}\n",
        p.name, static_cast<long long>(experts), mb, mq, mq / mb);
  }
  if (own_dir) fs::remove_all(root);
  return absl::OkStatus();
}

}  // namespace
}  // namespace moemesh

int main(int argc, char** argv) {
  auto args = moemesh::CliArgs::Parse(std::vector<std::string>(argv + 1, argv + argc),
                                      {"dir", "experts", "repeats"});
  absl::Status s = args.status();
  if (s.ok()) s = moemesh::Run(*args);
  if (!s.ok()) {
    std::fprintf(stderr, "load_bench: %s\n", std::string(s.message()).c_str());
    return 1;
  }
  return 0;
}
