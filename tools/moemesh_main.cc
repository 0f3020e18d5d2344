// moemesh: the command line.
//   moemesh layer --model DIR --layer N --input IN.safetensors --output OUT.safetensors
//   moemesh gen-model --family F --out DIR [sizes]
//   moemesh demo [--model DIR] [--tokens T] [--iters N]
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <iostream>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "services/checkpoint.h"
#include "services/model_config.h"
#include "services/model_generator.h"
#include "services/moe_layer.h"
#include "services/safetensors.h"
#include "services/status_macros.h"
#include "tools/cli_args.h"

namespace moemesh {
namespace {

constexpr char kUsage[] =
    "usage: moemesh <command> [flags]\n"
    "  layer      --model DIR --layer N --input IN.safetensors --output OUT.safetensors\n"
    "             [--capacity-factor F] [--expert-choice]\n"
    "             IN holds hidden_states [T,H] (F32, BF16 or F16); OUT receives output [T,H]\n"
    "             (same dtype), topk_ids I32 [T,k] and topk_weights F32 [T,k].\n"
    "  gen-model  --family F --out DIR [--hidden H] [--intermediate I] [--experts E]\n"
    "             [--top-k K] [--layers L] [--shared-intermediate S] [--groups G]\n"
    "             [--topk-groups G] [--dtype f32|bf16|f16] [--shards N] [--seed S]\n"
    "             writes a random checkpoint in the family's Hugging Face layout\n"
    "  demo       [--model DIR] [--family F] [--tokens T] [--iters N]\n"
    "             runs every MoE layer of a (generated) model in-process and reports\n";

absl::StatusOr<DType> ParseDType(const std::string& s) {
  const std::string l = absl::AsciiStrToLower(s);
  if (l == "f32" || l == "float32") return DType::kF32;
  if (l == "bf16" || l == "bfloat16") return DType::kBF16;
  if (l == "f16" || l == "float16") return DType::kF16;
  return absl::InvalidArgumentError(absl::StrCat("unknown dtype '", s, "' (want f32, bf16, f16)"));
}

struct LoadedModel {
  std::unique_ptr<Checkpoint> ckpt;
  MoeModelConfig config;
};

absl::StatusOr<LoadedModel> LoadModel(const std::string& dir) {
  LoadedModel m;
  ASSIGN_OR_RETURN(m.ckpt, Checkpoint::Open(dir));
  auto config = ParseMoeModelConfig(m.ckpt->config());
  if (!config.ok()) {
    return absl::Status(config.status().code(), absl::StrCat(dir, "/", config.status().message()));
  }
  m.config = *config;
  return m;
}

absl::StatusOr<MoeLayerOptions> LayerOptions(const CliArgs& args) {
  MoeLayerOptions o;
  ASSIGN_OR_RETURN(o.capacity_factor, args.Double("capacity-factor", 0.0));
  if (args.Has("expert-choice")) o.mode = RoutingMode::kExpertChoice;
  RETURN_IF_ERROR(o.Validate());
  return o;
}

absl::Status RunLayer(const std::vector<std::string>& argv) {
  ASSIGN_OR_RETURN(CliArgs args, CliArgs::Parse(argv, {"model", "layer", "input", "output",
                                                       "capacity-factor", "expert-choice"},
                                                {"expert-choice"}));
  ASSIGN_OR_RETURN(std::string model_dir, args.Required("model"));
  ASSIGN_OR_RETURN(std::string input, args.Required("input"));
  ASSIGN_OR_RETURN(std::string output, args.Required("output"));
  if (!args.Has("layer")) return absl::InvalidArgumentError("missing --layer");
  ASSIGN_OR_RETURN(int64_t layer, args.Int("layer", 0));
  ASSIGN_OR_RETURN(MoeLayerOptions options, LayerOptions(args));
  ASSIGN_OR_RETURN(LoadedModel m, LoadModel(model_dir));
  ASSIGN_OR_RETURN(auto moe, MoeLayer::Create(*m.ckpt, m.config, layer, options));
  ASSIGN_OR_RETURN(auto in, SafetensorsFile::Open(input));
  ASSIGN_OR_RETURN(Tensor hidden, in->Get("hidden_states"));
  auto out = moe->Forward(hidden);
  if (!out.ok()) {
    return absl::Status(out.status().code(), absl::StrCat(input, ": ", out.status().message()));
  }
  RETURN_IF_ERROR(WriteSafetensors(output, {{"output", out->output},
                                            {"topk_ids", out->topk_ids},
                                            {"topk_weights", out->topk_weights}}));
  std::fprintf(stderr, "layer %lld: %lld tokens -> %s (%lld slots dropped)\n",
               static_cast<long long>(layer), static_cast<long long>(hidden.dim(0)),
               output.c_str(), static_cast<long long>(out->dropped));
  return absl::OkStatus();
}

absl::StatusOr<GenModelOptions> GenOptions(const CliArgs& args) {
  GenModelOptions o;
  ASSIGN_OR_RETURN(std::string family, args.Required("family"));
  ASSIGN_OR_RETURN(o.family, FamilyFromName(family));
  ASSIGN_OR_RETURN(o.hidden, args.Int("hidden", o.hidden));
  ASSIGN_OR_RETURN(o.intermediate, args.Int("intermediate", o.intermediate));
  ASSIGN_OR_RETURN(o.experts, args.Int("experts", o.experts));
  ASSIGN_OR_RETURN(o.top_k, args.Int("top-k", o.top_k));
  ASSIGN_OR_RETURN(o.layers, args.Int("layers", o.layers));
  ASSIGN_OR_RETURN(o.shared_intermediate, args.Int("shared-intermediate", o.shared_intermediate));
  ASSIGN_OR_RETURN(o.num_groups, args.Int("groups", o.num_groups));
  ASSIGN_OR_RETURN(o.topk_groups, args.Int("topk-groups", o.topk_groups));
  ASSIGN_OR_RETURN(int64_t shards, args.Int("shards", o.shards));
  o.shards = static_cast<int>(std::clamp<int64_t>(shards, -1, 1 << 20));
  ASSIGN_OR_RETURN(int64_t seed, args.Int("seed", 0));
  o.seed = static_cast<uint64_t>(seed);
  ASSIGN_OR_RETURN(o.dtype, ParseDType(args.String("dtype", "bf16")));
  RETURN_IF_ERROR(o.Validate());
  return o;
}

const std::set<std::string> kGenFlags = {"family", "out", "hidden", "intermediate", "experts",
                                         "top-k", "layers", "shared-intermediate", "groups",
                                         "topk-groups", "dtype", "shards", "seed"};

absl::Status RunGenModel(const std::vector<std::string>& argv) {
  ASSIGN_OR_RETURN(CliArgs args, CliArgs::Parse(argv, kGenFlags));
  ASSIGN_OR_RETURN(std::string out, args.Required("out"));
  ASSIGN_OR_RETURN(GenModelOptions o, GenOptions(args));
  RETURN_IF_ERROR(GenerateModel(out, o));
  std::printf("wrote %s checkpoint to %s\n", std::string(FamilyName(o.family)).c_str(), out.c_str());
  return absl::OkStatus();
}

absl::Status RunDemo(const std::vector<std::string>& argv) {
  std::set<std::string> flags = kGenFlags;
  flags.erase("out");
  flags.insert({"model", "tokens", "iters", "capacity-factor", "expert-choice"});
  std::vector<std::string> with_family = argv;
  ASSIGN_OR_RETURN(CliArgs args, CliArgs::Parse(argv, flags, {"expert-choice"}));
  ASSIGN_OR_RETURN(int64_t tokens, args.Int("tokens", 64));
  ASSIGN_OR_RETURN(int64_t iters, args.Int("iters", 5));
  if (tokens <= 0 || iters <= 0) return absl::InvalidArgumentError("--tokens and --iters must be positive");
  ASSIGN_OR_RETURN(MoeLayerOptions options, LayerOptions(args));
  std::string dir = args.String("model", "");
  if (dir.empty()) {
    if (!args.Has("family")) with_family.push_back("--family=mixtral");
    ASSIGN_OR_RETURN(CliArgs gen_args, CliArgs::Parse(with_family, flags, {"expert-choice"}));
    ASSIGN_OR_RETURN(GenModelOptions o, GenOptions(gen_args));
    dir = (std::filesystem::temp_directory_path() /
           absl::StrCat("moemesh-demo-", FamilyName(o.family), "-", ::getpid()))
              .string();
    RETURN_IF_ERROR(GenerateModel(dir, o));
    std::printf("generated %s model in %s (H=%lld I=%lld E=%lld k=%lld, %lld layers)\n",
                std::string(FamilyName(o.family)).c_str(), dir.c_str(), (long long)o.hidden,
                (long long)o.intermediate, (long long)o.experts, (long long)o.top_k,
                (long long)o.layers);
  }
  ASSIGN_OR_RETURN(LoadedModel m, LoadModel(dir));
  const MoeModelConfig& c = m.config;
  std::mt19937 rng(1);
  std::normal_distribution<float> nd;
  Tensor x = Tensor::Empty(DType::kF32, {tokens, c.hidden_size});
  for (int64_t i = 0; i < x.numel(); ++i) x.mutable_data<float>()[i] = nd(rng);
  for (int64_t layer : c.MoeLayers()) {
    ASSIGN_OR_RETURN(auto moe, MoeLayer::Create(*m.ckpt, c, layer, options));
    std::vector<int64_t> load(c.num_experts, 0);
    double best_ms = 1e30;
    int64_t dropped = 0;
    for (int64_t it = 0; it < iters; ++it) {
      const auto t0 = std::chrono::steady_clock::now();
      ASSIGN_OR_RETURN(MoeLayerOutput out, moe->Forward(x));
      best_ms = std::min(best_ms, std::chrono::duration<double, std::milli>(
                                      std::chrono::steady_clock::now() - t0).count());
      if (it == 0) {
        for (int64_t i = 0; i < out.topk_ids.numel(); ++i) {
          const int32_t e = out.topk_ids.data<int32_t>()[i];
          if (e >= 0) ++load[e];
        }
        dropped = out.dropped;
      }
    }
    std::printf("layer %lld: %lld tokens in %.3f ms (%.0f tokens/s), weights %.1f MiB, %lld dropped\n",
                (long long)layer, (long long)tokens, best_ms, tokens / (best_ms / 1e3),
                moe->weight_bytes() / 1048576.0, (long long)dropped);
    std::printf("  load per expert:");
    for (int64_t e = 0; e < c.num_experts; ++e) std::printf(" %lld", (long long)load[e]);
    std::printf("\n");
  }
  return absl::OkStatus();
}

}  // namespace
}  // namespace moemesh

int main(int argc, char** argv) {
  if (argc < 2 || std::string(argv[1]) == "--help" || std::string(argv[1]) == "help") {
    std::fputs(moemesh::kUsage, argc < 2 ? stderr : stdout);
    return argc < 2 ? 2 : 0;
  }
  const std::string cmd = argv[1];
  const std::vector<std::string> rest(argv + 2, argv + argc);
  absl::Status st;
  if (cmd == "layer") {
    st = moemesh::RunLayer(rest);
  } else if (cmd == "gen-model") {
    st = moemesh::RunGenModel(rest);
  } else if (cmd == "demo") {
    st = moemesh::RunDemo(rest);
  } else {
    std::fprintf(stderr, "moemesh: unknown command '%s'\n%s", cmd.c_str(), moemesh::kUsage);
    return 2;
  }
  if (!st.ok()) {
    std::fprintf(stderr, "moemesh %s: %s\n", cmd.c_str(), std::string(st.ToString()).c_str());
    return 1;
  }
  return 0;
}
