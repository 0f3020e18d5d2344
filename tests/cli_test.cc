// The moemesh command line as a user runs it: a real process, real files.
#include <gtest/gtest.h>
#include <sys/wait.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "services/model/safetensors.h"
#include "tools/process.h"

#ifndef MOEMESH_BINARY
#error "MOEMESH_BINARY must name the moemesh executable"
#endif

namespace moemesh {
namespace {

using CliRun = ShellResult;

// `moemesh ARGS`: its exit code and stdout + stderr.
CliRun Moemesh(const std::string& args) {
  return RunShell(absl::StrCat(MOEMESH_BINARY, " ", args, " 2>&1"));
}

std::string Tmp(const std::string& name) {
  return (std::filesystem::path(::testing::TempDir()) / name).string();
}

TEST(CliTest, LayerWritesOutputTopkIdsAndWeights) {
  const std::string out = Tmp("cli_layer_out.safetensors");
  CliRun r = Moemesh(absl::StrCat("layer --model tests/fixtures/deepseek_v3 --layer 2 --input ",
                                  "tests/fixtures/deepseek_v3/input.safetensors --output ", out));
  ASSERT_EQ(r.exit_code, 0) << r.output;
  auto file = SafetensorsFile::Open(out);
  ASSERT_TRUE(file.ok()) << file.status();
  auto expected = SafetensorsFile::Open("tests/fixtures/deepseek_v3/expected.safetensors").value();
  const Tensor got = (*file)->Get("output").value();
  const Tensor want = expected->Get("output.2").value();
  ASSERT_EQ(got.shape(), want.shape());
  ASSERT_EQ(got.dtype(), DType::kF32);
  double err = 0, norm = 0;
  for (int64_t i = 0; i < got.numel(); ++i) {
    err += std::pow(double(got.data<float>()[i]) - want.data<float>()[i], 2);
    norm += std::pow(double(want.data<float>()[i]), 2);
  }
  EXPECT_LE(std::sqrt(err / norm), 1e-5);
  // The experts and weights the CLI wrote are the PyTorch reference's.
  const Tensor ids = (*file)->Get("topk_ids").value();
  const Tensor weights = (*file)->Get("topk_weights").value();
  const Tensor want_ids = expected->Get("topk_ids.2").value();
  const Tensor want_w = expected->Get("topk_weights.2").value();
  ASSERT_EQ(ids.dtype(), DType::kI32);
  ASSERT_EQ(ids.shape(), (std::vector<int64_t>{24, 4}));
  ASSERT_EQ(ids.shape(), want_ids.shape());
  ASSERT_EQ(weights.dtype(), DType::kF32);
  ASSERT_EQ(weights.shape(), want_w.shape());
  for (int64_t i = 0; i < want_ids.numel(); ++i) {
    EXPECT_EQ(ids.data<int32_t>()[i], want_ids.data<int32_t>()[i]) << "slot " << i;
    EXPECT_NEAR(weights.data<float>()[i], want_w.data<float>()[i],
                1e-5 * std::max(1.0f, std::abs(want_w.data<float>()[i])))
        << "slot " << i;
  }
}

TEST(CliTest, Bf16InputGivesBf16Output) {
  const std::string out = Tmp("cli_bf16_out.safetensors");
  CliRun r =
      Moemesh(absl::StrCat("layer --model tests/fixtures/mixtral_bf16 --layer 1 --input ",
                           "tests/fixtures/mixtral_bf16/input_bf16.safetensors --output ", out));
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_EQ(SafetensorsFile::Open(out).value()->Get("output").value().dtype(), DType::kBF16);
}

TEST(CliTest, GenModelThenLayerRoundTrip) {
  const std::string dir = Tmp("cli_gen_gptoss");
  CliRun g = Moemesh(
      absl::StrCat("gen-model --family gpt_oss --out ", dir,
                   " --hidden 32 --intermediate 16 --experts 4 --top-k 2 --layers 1 --shards 2"));
  ASSERT_EQ(g.exit_code, 0) << g.output;
  EXPECT_TRUE(std::filesystem::exists(dir + "/model.safetensors.index.json"));
  Tensor x = Tensor::Zeros(DType::kF16, {3, 32});
  const std::string in = Tmp("cli_gen_in.safetensors"), out = Tmp("cli_gen_out.safetensors");
  ASSERT_TRUE(WriteSafetensors(in, {{"hidden_states", x}}).ok());
  CliRun r =
      Moemesh(absl::StrCat("layer --model ", dir, " --layer 0 --input ", in, " --output ", out));
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_EQ(SafetensorsFile::Open(out).value()->Get("output").value().dtype(), DType::kF16);
}

TEST(CliTest, BadInputsFailWithAMessageNamingTheProblem) {
  const std::string out = Tmp("cli_bad_out.safetensors");
  const std::string model = "--model tests/fixtures/mixtral --output " + out;
  struct Case {
    std::string args;
    std::string needle;
  };
  const std::string wrong_h = Tmp("cli_wrong_h.safetensors");
  ASSERT_TRUE(
      WriteSafetensors(wrong_h, {{"hidden_states", Tensor::Zeros(DType::kF32, {2, 63})}}).ok());
  const std::string ints = Tmp("cli_ints.safetensors");
  ASSERT_TRUE(
      WriteSafetensors(ints, {{"hidden_states", Tensor::Zeros(DType::kI32, {2, 64})}}).ok());
  const std::string no_hidden = Tmp("cli_nohidden.safetensors");
  ASSERT_TRUE(WriteSafetensors(no_hidden, {{"x", Tensor::Zeros(DType::kF32, {2, 64})}}).ok());
  const std::string in = " --input tests/fixtures/mixtral/input.safetensors";
  const Case cases[] = {
      {model + " --layer 7" + in, "layer 7 does not exist"},
      {model + " --layer -1" + in, "layer -1"},
      {model + " --layer x" + in, "--layer wants an integer"},
      {model + in, "missing --layer"},
      {model + " --layer 0 --input " + wrong_h, "expected [T, 64]"},
      {model + " --layer 0 --input " + ints, "dtype I32"},
      {model + " --layer 0 --input " + no_hidden, "hidden_states"},
      {model + " --layer 0 --input /nonexistent.safetensors", "/nonexistent.safetensors"},
      {"--model /nonexistent --layer 0 --output " + out + in, "/nonexistent"},
      {"--model tests/fixtures/qwen2_moe --layer 0 --output " + out +
           " --input tests/fixtures/qwen2_moe/input.safetensors",
       "dense"},
      {model + " --layer 0 --bogus 1" + in, "unknown flag --bogus"},
  };
  for (const Case& c : cases) {
    CliRun r = Moemesh("layer " + c.args);
    EXPECT_EQ(r.exit_code, 1) << c.args << "\n" << r.output;
    EXPECT_NE(r.output.find(c.needle), std::string::npos) << c.args << "\n" << r.output;
  }
  CliRun unknown = Moemesh("gen-model --family llama --out " + Tmp("x"));
  EXPECT_EQ(unknown.exit_code, 1);
  EXPECT_NE(unknown.output.find("unsupported model_type 'llama'"), std::string::npos)
      << unknown.output;
  EXPECT_EQ(Moemesh("frobnicate").exit_code, 2);
}

TEST(CliTest, BadMetricsFlagsFailWithAMessage) {
  const std::string m = "--model tests/fixtures/mixtral";
  const std::pair<std::string, std::string> cases[] = {
      {"expert " + m + " --metrics-listen 127.0.0.1:0 --expert-metrics 9", "--expert-metrics"},
      {"expert " + m + " --metrics-listen 127.0.0.1:0 --expert-metrics few", "'few'"},
      {"expert " + m + " --metrics-listen nonsense", "metrics listen 'nonsense'"},
      {"router " + m + " --endpoints a:1 --metrics-listen 127.0.0.1:0 --expert-metrics 5",
       "--expert-metrics"},
      {"router " + m + " --endpoints a:1 --load-window-s 0", "--load-window-s"},
  };
  for (const auto& [args, needle] : cases) {
    CliRun r = Moemesh(args);
    EXPECT_EQ(r.exit_code, 1) << args << "\n" << r.output;
    EXPECT_NE(r.output.find(needle), std::string::npos) << args << "\n" << r.output;
  }
}

// --device: a bad value names the flag; cuda on a machine without a GPU (or a build
// without CUDA) says why instead of starting a service that cannot compute.
TEST(CliTest, DeviceFlagsFailWithAMessage) {
  const std::string m = "--model tests/fixtures/mixtral";
  const std::pair<std::string, std::string> cases[] = {
      {"expert " + m + " --device gpu", "--device must be cpu or cuda"},
      {"router " + m + " --endpoints a:1 --device tpu", "--device must be cpu or cuda"},
      {"expert " + m + " --device cuda --gpu -1", "--gpu wants GPU numbers"},
      {"expert " + m + " --device cuda --gpu 0,x", "got 'x'"},
      {"expert " + m + " --device cuda --gpu 0,1,0", "--gpu names GPU 0 twice"},
      {"expert " + m + " --device cuda --gpu 0,1 --gpu-rebalance-s -1",
       "--gpu-rebalance-s must be in"},
      {"router " + m + " --endpoints a:1 --device cuda --gpu 0,1",
       "the router's gating runs on one GPU"},
  };
  for (const auto& [args, needle] : cases) {
    CliRun r = Moemesh(args);
    EXPECT_EQ(r.exit_code, 1) << args << "\n" << r.output;
    EXPECT_NE(r.output.find(needle), std::string::npos) << args << "\n" << r.output;
  }
  if (std::filesystem::exists("/dev/nvidia0")) return;  // a GPU machine: they would serve
  for (const std::string& args :
       {"expert " + m + " --device cuda", "router " + m + " --endpoints a:1 --device cuda"}) {
    CliRun r = Moemesh(args + " --listen 127.0.0.1:0");
    EXPECT_EQ(r.exit_code, 1) << args << "\n" << r.output;
    EXPECT_NE(r.output.find("--device cuda"), std::string::npos) << args << "\n" << r.output;
  }
}

TEST(CliTest, DemoRunsEveryMoeLayer) {
  CliRun r = Moemesh(
      "demo --in-process --family deepseek_v3 --hidden 64 --intermediate 32 --experts 8 --top-k 2 "
      "--layers 3 --tokens 16 --iters 1");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_EQ(r.output.find("layer 0:"), std::string::npos) << "layer 0 is dense";
  EXPECT_NE(r.output.find("layer 1:"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("layer 2:"), std::string::npos) << r.output;
}

// The main job: a controller, 3 expert services and a router; --skew then makes a few
// experts hot, has the controller rebalance, and reports the load before and after.
TEST(CliTest, DemoSkewIsRebalancedByTheControllerAndLosesNothing) {
  CliRun r =
      Moemesh("demo --skew --hidden 64 --intermediate 48 --experts 8 --requests 16 --tokens 16");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("starting a placement controller, 3 expert services"), std::string::npos)
      << r.output;
  EXPECT_NE(r.output.find("answers identical to MoeLayer: 16 of 16 (0 failed)"), std::string::npos)
      << r.output;
  EXPECT_NE(r.output.find(", failed 0, answers differing from MoeLayer 0"), std::string::npos)
      << r.output;
  // "balance (mean/max over services): X" before, then after the round.
  std::vector<double> balance;
  const std::string key = "balance (mean/max over services): ";
  for (size_t at = r.output.find(key); at != std::string::npos; at = r.output.find(key, at + 1)) {
    balance.push_back(std::atof(r.output.c_str() + at + key.size()));
  }
  ASSERT_EQ(balance.size(), 2u) << r.output;
  // The hot experts (80% of the pushes) start on one service of three; each token's other
  // top-2 choice still varies, so that service computes about half the tokens: ~0.7.
  EXPECT_LT(balance[0], 0.8) << r.output;
  EXPECT_GT(balance[1], 0.85) << r.output;
  EXPECT_GT(balance[1], balance[0] + 0.15) << r.output;
  EXPECT_NE(r.output.find("moves: "), std::string::npos);
  EXPECT_EQ(r.output.find("moves: 0 replicas added"), std::string::npos) << r.output;
}

TEST(CliTest, DemoStaticRunsAFixedPlacementWithoutAController) {
  CliRun r = Moemesh(
      "demo --static --placement round-robin --expert-services 2 --hidden 64 --intermediate 48 "
      "--experts 8 --requests 8");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("fixed round-robin placement"), std::string::npos) << r.output;
  EXPECT_EQ(r.output.find("controller"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("answers identical to MoeLayer: 8 of 8 (0 failed)"), std::string::npos)
      << r.output;
}

TEST(CliTest, DemoAndPlacementFlagsFailWithAMessage) {
  const std::pair<const char*, const char*> cases[] = {
      {"demo --placement contiguous", "--placement sets a fixed placement: it needs --static"},
      {"demo --static --skew", "--skew and --routers need the controller"},
      {"demo --routers 0", "1 <= --routers <= 16"},
      {"placement", "missing show, rebalance or drain"},
      {"placement move --controller 127.0.0.1:1", "unknown placement command 'move'"},
      {"placement show", "--controller"},
      {"placement drain --controller 127.0.0.1:1", "drain needs the service's ENDPOINT"},
      {"placement show --controller 127.0.0.1:1 --timeout-s 2", "UNAVAILABLE"},
      {"controller --listen 127.0.0.1:0", "--model"},
  };
  for (const auto& [args, message] : cases) {
    SCOPED_TRACE(args);
    CliRun r = Moemesh(args);
    EXPECT_NE(r.exit_code, 0) << r.output;
    EXPECT_NE(r.output.find(message), std::string::npos) << r.output;
  }
}

// `moemesh COMMAND --help` (or -h) prints that command's usage on stdout and exits 0, with
// nothing on stderr.
TEST(CliTest, HelpPrintsTheUsageOnStdoutAndExitsZero) {
  const std::vector<std::pair<std::string, std::string>> commands = {
      {"router", "moemesh router"},         {"expert", "moemesh expert"},
      {"controller", "moemesh controller"}, {"placement", "moemesh placement show"},
      {"layer", "usage: moemesh"},          {"gen-model", "usage: moemesh"},
      {"demo", "usage: moemesh"},
  };
  for (const auto& [command, usage] : commands) {
    for (const char* flag : {"--help", "-h"}) {
      const std::string err = Tmp(absl::StrCat("help_", command, ".err"));
      const ShellResult r =
          RunShell(absl::StrCat(MOEMESH_BINARY, " ", command, " ", flag, " 2>", err));
      EXPECT_EQ(r.exit_code, 0) << command << " " << flag;
      EXPECT_NE(r.output.find(usage), std::string::npos)
          << command << " " << flag << ": " << r.output;
      std::ifstream e(err);
      const std::string stderr_text((std::istreambuf_iterator<char>(e)), {});
      EXPECT_EQ(stderr_text, "") << command << " " << flag;
      std::filesystem::remove(err);
    }
  }
}

}  // namespace
}  // namespace moemesh
