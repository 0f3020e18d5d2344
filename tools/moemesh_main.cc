// moemesh: the command line.
//   moemesh layer --model DIR --layer N --input IN.safetensors --output OUT.safetensors
//   moemesh gen-model --family F --out DIR [sizes]
//   moemesh demo [flags]  (tools/demo.h)
//   moemesh router|expert|controller [flags]; moemesh placement show|rebalance|drain
#include <cstdio>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "expert_service/expert_main.h"
#include "router_service/router_main.h"
#include "services/base/status_macros.h"
#include "services/controller/controller_main.h"
#include "services/model/safetensors.h"
#include "services/runtime/flags.h"
#include "services/runtime/serving_settings.h"
#include "tools/cli_common.h"
#include "tools/demo.h"
#include "tools/placement_cli.h"

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
    "  demo       [--model DIR | --family F and gen-model sizes] [--expert-services N]\n"
    "             [--routers R] [--replicas R] [--wire f32|bf16] [--tokens T] [--requests N]\n"
    "             [--concurrency C] [--serve] [--port P] [--transport grpc|ucx] [--skew]\n"
    "             starts a placement controller, N expert services and the routers on\n"
    "             loopback, drives ModelInfer, checks every answer against the in-process\n"
    "             MoeLayer and reports; --skew then sends a skewed load (a few hot experts),\n"
    "             has the controller rebalance and prints the per-service load before and\n"
    "             after, the moves and the failed requests; --static [--placement\n"
    "             contiguous|round-robin] runs a fixed placement without a controller;\n"
    "             --in-process [--iters N] runs the layers in this process instead\n"
    "  router     the router service (moemesh router --help)\n"
    "  expert     an expert service (moemesh expert --help)\n"
    "  controller the placement controller (moemesh controller --help)\n"
    "  placement  show|rebalance|drain ENDPOINT --controller H:P: operate a controller\n";

absl::Status RunLayer(const std::vector<std::string>& argv) {
  ASSIGN_OR_RETURN(CliArgs args, CliArgs::Parse(argv,
                                                {"model", "layer", "input", "output",
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
  RETURN_IF_ERROR(WriteSafetensors(
      output,
      {{"output", out->output}, {"topk_ids", out->topk_ids}, {"topk_weights", out->topk_weights}}));
  std::fprintf(stderr, "layer %lld: %lld tokens -> %s (%lld slots dropped)\n",
               static_cast<long long>(layer), static_cast<long long>(hidden.dim(0)), output.c_str(),
               static_cast<long long>(out->dropped));
  return absl::OkStatus();
}

absl::Status RunGenModel(const std::vector<std::string>& argv) {
  ASSIGN_OR_RETURN(CliArgs args, CliArgs::Parse(argv, GenFlags()));
  ASSIGN_OR_RETURN(std::string out, args.Required("out"));
  ASSIGN_OR_RETURN(GenModelOptions o, GenOptions(args));
  RETURN_IF_ERROR(GenerateModel(out, o));
  std::printf("wrote %s checkpoint to %s\n", std::string(FamilyName(o.family)).c_str(),
              out.c_str());
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
  if ((cmd == "layer" || cmd == "gen-model" || cmd == "demo") && moemesh::HelpRequested(rest)) {
    std::fputs(moemesh::kUsage, stdout);
    return 0;
  }
  // The services configure themselves (RunServiceMain), each for its role.
  if (cmd == "layer" || cmd == "gen-model" || cmd == "demo") moemesh::ConfigureForServing();
  absl::Status st;
  if (cmd == "layer") {
    st = moemesh::RunLayer(rest);
  } else if (cmd == "gen-model") {
    st = moemesh::RunGenModel(rest);
  } else if (cmd == "demo") {
    st = moemesh::RunDemo(rest);
  } else if (cmd == "router") {
    return moemesh::RouterMain(rest);
  } else if (cmd == "expert") {
    return moemesh::ExpertServiceMain(rest);
  } else if (cmd == "controller") {
    return moemesh::ControllerMain(rest);
  } else if (cmd == "placement") {
    return moemesh::PlacementCommand(rest);
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
