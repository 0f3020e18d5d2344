#include "tools/cli_common.h"

#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <filesystem>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "services/base/status_macros.h"

namespace moemesh {

RemovedAtExit::~RemovedAtExit() {
  std::error_code ignored;
  if (!dir.empty()) std::filesystem::remove_all(dir, ignored);
}

absl::StatusOr<DType> ParseDType(const std::string& s) {
  const std::string l = absl::AsciiStrToLower(s);
  if (l == "f32" || l == "float32") return DType::kF32;
  if (l == "bf16" || l == "bfloat16") return DType::kBF16;
  if (l == "f16" || l == "float16") return DType::kF16;
  return absl::InvalidArgumentError(absl::StrCat("unknown dtype '", s, "' (want f32, bf16, f16)"));
}

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

const std::set<std::string>& GenFlags() {
  static const std::set<std::string> flags = {
      "family",  "out",         "hidden", "intermediate",
      "experts", "top-k",       "layers", "shared-intermediate",
      "groups",  "topk-groups", "dtype",  "shards",
      "seed"};
  return flags;
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

absl::StatusOr<std::string> DemoModelDir(const std::vector<std::string>& argv,
                                         const std::set<std::string>& flags,
                                         const std::set<std::string>& bool_flags,
                                         RemovedAtExit* generated) {
  ASSIGN_OR_RETURN(CliArgs args, CliArgs::Parse(argv, flags, bool_flags));
  std::string dir = args.String("model", "");
  if (!dir.empty()) return dir;
  std::vector<std::string> gen = argv;
  if (!args.Has("family")) gen.push_back("--family=mixtral");
  ASSIGN_OR_RETURN(CliArgs gen_args, CliArgs::Parse(gen, flags, bool_flags));
  ASSIGN_OR_RETURN(GenModelOptions o, GenOptions(gen_args));
  dir = (std::filesystem::temp_directory_path() /
         absl::StrCat("moemesh-demo-", FamilyName(o.family), "-", ::getpid()))
            .string();
  generated->dir = dir;  // removed however the demo ends, even half written
  RETURN_IF_ERROR(GenerateModel(dir, o));
  std::printf("generated a %s model in %s (H=%lld I=%lld E=%lld k=%lld, %lld layers)\n",
              std::string(FamilyName(o.family)).c_str(), dir.c_str(), (long long)o.hidden,
              (long long)o.intermediate, (long long)o.experts, (long long)o.top_k,
              (long long)o.layers);
  return dir;
}

}  // namespace moemesh
