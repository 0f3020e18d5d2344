// moe_layer_bench: the CPU MoeLayer against the GEMMs it makes, at several token counts.
//
// For each T it times, interleaved repeat by repeat after warm-up:
//   layer  MoeLayer::Forward on [T, H] float32 input;
//   gemm   exactly the BLAS calls the layer makes for that input, with nothing else: the
//          router GEMM per token chunk, then per expert, with the row count n_e the
//          layer's own routing gave it, the canonical gate/up and down tasks of
//          kernels/cpu/expert_ffn.h (GEMV when n_e = 1), on the same thread pool and
//          preallocated buffers;
// and prints one JSON line per T:
//   {"T":..,"layer_ms_median":..,"layer_ms_min":..,"gemm_ms_median":..,"gemm_ms_min":..,
//    "overhead_ratio":..}           overhead_ratio = layer median / GEMM median
// (plus the expert row counts and thread count).
//
// Inputs are N(0,1) rows redrawn until each token's k-th and (k+1)-th router logits differ by
// more than 1e-3, so float32 rounding in another implementation (bench/torch_moe_block.py)
// cannot flip an expert choice. They are written to --input-dir (hidden_states_T<T>.safetensors)
// or read from there when present; the layer's outputs go to --output-dir
// (output_T<T>.safetensors: output, topk_ids, topk_weights) for the PyTorch side to check.
//
// Threads: ThreadPool::Default() (MOEMESH_THREADS, else all cores); BLAS runs single-threaded
// inside its tasks, as in the layer. Token-choice, dropless routing only.
#include <cblas.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "kernels/cpu/dispatch.h"
#include "kernels/cpu/expert_ffn.h"
#include "kernels/cpu/routing.h"
#include "nlohmann/json.hpp"
#include "services/base/status_macros.h"
#include "services/base/thread_pool.h"
#include "services/model/checkpoint.h"
#include "services/model/model_config.h"
#include "services/model/model_generator.h"
#include "services/model/moe_weights.h"
#include "services/model/safetensors.h"
#include "services/moe/moe_layer.h"
#include "services/runtime/flags.h"
#include "services/runtime/serving_settings.h"

namespace moemesh {
namespace {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

constexpr char kUsage[] =
    "usage: moe_layer_bench [--model DIR | --gen-dir DIR] [--hidden H] [--intermediate I]\n"
    "         [--experts E] [--top-k K] [--layer L] [--tokens 1,32,256,1024] [--repeats N]\n"
    "         [--warmup N] [--input-dir DIR] [--output-dir DIR] [--seed S]\n"
    "  Without --model, generates (or reuses, when its config matches) an F32 one-layer\n"
    "  Mixtral checkpoint in --gen-dir (default: a temporary folder).\n";

// Router logits below this margin between the k-th and (k+1)-th choice are redrawn.
constexpr float kRoutingMargin = 1e-3f;

double MsSince(Clock::time_point t0) {
  return std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
}

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

double Min(const std::vector<double>& v) { return *std::min_element(v.begin(), v.end()); }

struct BenchOptions {
  std::string model_dir;
  std::string gen_dir;
  GenModelOptions gen;
  int64_t layer = -1;  // -1: the first MoE layer
  std::vector<int64_t> tokens = {1, 32, 256, 1024};
  int64_t repeats = 10;
  int64_t warmup = 1;
  std::string input_dir;
  std::string output_dir;
  uint64_t seed = 1234;
};

absl::StatusOr<BenchOptions> ParseFlags(int argc, char** argv) {
  ASSIGN_OR_RETURN(CliArgs args, CliArgs::Parse(std::vector<std::string>(argv + 1, argv + argc),
                                                {"model", "gen-dir", "hidden", "intermediate",
                                                 "experts", "top-k", "layer", "tokens", "repeats",
                                                 "warmup", "input-dir", "output-dir", "seed"}));
  BenchOptions o;
  o.model_dir = args.String("model", "");
  o.gen_dir = args.String("gen-dir", "");
  o.gen.family = ModelFamily::kMixtral;
  o.gen.dtype = DType::kF32;
  o.gen.layers = 1;
  ASSIGN_OR_RETURN(o.gen.hidden, args.Int("hidden", 1024));
  ASSIGN_OR_RETURN(o.gen.intermediate, args.Int("intermediate", 3584));
  ASSIGN_OR_RETURN(o.gen.experts, args.Int("experts", 8));
  ASSIGN_OR_RETURN(o.gen.top_k, args.Int("top-k", 2));
  RETURN_IF_ERROR(o.gen.Validate());
  ASSIGN_OR_RETURN(o.layer, args.Int("layer", -1));
  o.tokens.clear();
  for (absl::string_view s : absl::StrSplit(args.String("tokens", "1,32,256,1024"), ',')) {
    int64_t t;
    if (!absl::SimpleAtoi(s, &t) || t <= 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("--tokens wants positive integers, got '", std::string(s), "'"));
    }
    o.tokens.push_back(t);
  }
  ASSIGN_OR_RETURN(o.repeats, args.Int("repeats", 10));
  ASSIGN_OR_RETURN(o.warmup, args.Int("warmup", 1));
  if (o.repeats <= 0 || o.warmup < 0) {
    return absl::InvalidArgumentError("--repeats must be > 0 and --warmup >= 0");
  }
  o.input_dir = args.String("input-dir", "");
  o.output_dir = args.String("output-dir", "");
  ASSIGN_OR_RETURN(int64_t seed, args.Int("seed", 1234));
  o.seed = static_cast<uint64_t>(seed);
  return o;
}

// The checkpoint folder to benchmark: --model, or a generated one (reused when a previous
// run left a checkpoint of the same sizes there, since generating 350 MB takes seconds).
absl::StatusOr<std::string> ModelDir(const BenchOptions& o) {
  if (!o.model_dir.empty()) return o.model_dir;
  const GenModelOptions& g = o.gen;
  std::string dir = o.gen_dir;
  if (dir.empty()) {
    dir = (fs::temp_directory_path() / absl::StrCat("moe_layer_bench-", g.hidden, "x",
                                                    g.intermediate, "x", g.experts, "k", g.top_k))
              .string();
  }
  std::ifstream f(fs::path(dir) / "config.json");
  if (f && fs::exists(fs::path(dir) / "model.safetensors")) {
    const nlohmann::json c = nlohmann::json::parse(f, nullptr, /*allow_exceptions=*/false);
    if (c.is_object() && c.value("model_type", "") == "mixtral" &&
        c.value("torch_dtype", "") == "float32" && c.value("hidden_size", 0) == g.hidden &&
        c.value("intermediate_size", 0) == g.intermediate &&
        c.value("num_local_experts", 0) == g.experts &&
        c.value("num_experts_per_tok", 0) == g.top_k && c.value("num_hidden_layers", 0) == 1) {
      std::fprintf(stderr, "reusing the generated checkpoint in %s\n", dir.c_str());
      return dir;
    }
  }
  std::fprintf(stderr, "generating an F32 Mixtral layer (H=%lld I=%lld E=%lld k=%lld) in %s\n",
               (long long)g.hidden, (long long)g.intermediate, (long long)g.experts,
               (long long)g.top_k, dir.c_str());
  RETURN_IF_ERROR(GenerateModel(dir, g));
  return dir;
}

// N(0,1) rows, each redrawn until its k-th and (k+1)-th router logits are kRoutingMargin
// apart. Softmax is monotonic, so a logit margin is a margin on the selection score too.
Tensor MakeInput(const GateWeights& gate, const MoeModelConfig& c, int64_t T, uint64_t seed) {
  const int64_t H = c.hidden_size, E = c.num_experts, k = c.top_k;
  Tensor x = Tensor::Empty(DType::kF32, {T, H});
  float* px = x.mutable_data<float>();
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> nd;
  std::vector<float> logits(E);
  for (int64_t t = 0; t < T; ++t) {
    float* row = px + t * H;
    for (int attempt = 0;; ++attempt) {
      for (int64_t h = 0; h < H; ++h) row[h] = nd(rng);
      if (k >= E) break;
      cblas_sgemv(CblasRowMajor, CblasNoTrans, E, H, 1.0f, gate.weight.data<float>(), H, row, 1,
                  0.0f, logits.data(), 1);
      std::sort(logits.begin(), logits.end(), std::greater<float>());
      if (logits[k - 1] - logits[k] > kRoutingMargin || attempt > 100) break;
    }
  }
  return x;
}

absl::StatusOr<Tensor> InputFor(const BenchOptions& o, const GateWeights& gate,
                                const MoeModelConfig& c, int64_t T) {
  const std::string path =
      o.input_dir.empty()
          ? ""
          : (fs::path(o.input_dir) / absl::StrCat("hidden_states_T", T, ".safetensors")).string();
  if (!path.empty() && fs::exists(path)) {
    ASSIGN_OR_RETURN(auto file, SafetensorsFile::Open(path));
    ASSIGN_OR_RETURN(Tensor x, file->Get("hidden_states"));
    if (x.rank() != 2 || x.dim(0) != T || x.dim(1) != c.hidden_size) {
      return absl::InvalidArgumentError(absl::StrCat(path, ": hidden_states has shape ",
                                                     ShapeString(x.shape()), ", expected [", T,
                                                     ", ", c.hidden_size, "]"));
    }
    return x.ToF32();  // an owned copy: the mapping closes with `file`
  }
  Tensor x = MakeInput(gate, c, T, o.seed + static_cast<uint64_t>(T));
  if (!path.empty()) {
    fs::create_directories(o.input_dir);
    RETURN_IF_ERROR(WriteSafetensors(path, {{"hidden_states", x}}));
  }
  return x;
}

// The float32 buffers of one T, preallocated so timed loops allocate nothing.
struct Workspace {
  DispatchPlan plan;  // built from the layer's own routing
  std::vector<float> logits, gx, gy, gu, h;
  std::vector<std::pair<int64_t, int64_t>> gate_up_tasks, down_tasks;  // (expert, task)
};

// y[rows, n] = x · Wᵀ as expert_ffn.cc issues it: GEMV for one row, else GEMM.
void MatMulT(const float* x, int64_t ldx, const float* w, int64_t ldw, int64_t rows, int64_t n,
             int64_t k, float* y, int64_t ldy) {
  if (rows == 1) {
    cblas_sgemv(CblasRowMajor, CblasNoTrans, n, k, 1.0f, w, ldw, x, 1, 0.0f, y, 1);
  } else {
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, rows, n, k, 1.0f, x, ldx, w, ldw, 0.0f, y,
                ldy);
  }
}

// Exactly the BLAS calls MoeLayer::ForwardF32 makes for this plan, split into the same
// tasks on the same thread pool, with nothing else: no routing, gather, activation or
// combine.
void GemmsOnly(const float* x, int64_t T, const MoeModelConfig& c, const GateWeights& gate,
               const std::vector<ExpertFfnWeights>& experts, ThreadPool& pool, Workspace& w) {
  const int64_t H = c.hidden_size, E = c.num_experts, I = c.expert_intermediate;
  constexpr int64_t kTokens = 64;  // MoeLayer's routing chunk
  pool.ParallelFor((T + kTokens - 1) / kTokens, [&](int64_t ch) {
    const int64_t t0 = ch * kTokens, n = std::min(kTokens, T - t0);
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, E, H, 1.0f, x + t0 * H, H,
                gate.weight.data<float>(), H, 0.0f, w.logits.data() + t0 * E, E);
  });
  pool.ParallelFor(static_cast<int64_t>(w.gate_up_tasks.size()), [&](int64_t i) {
    const auto [e, task] = w.gate_up_tasks[i];
    const ExpertFfnWeights& ew = experts[e];
    const int64_t off = w.plan.expert_offsets[e], n = w.plan.rows_of(static_cast<int>(e));
    const int64_t ld = ew.gate_up_rows();
    const int64_t c0 = 2 * task * kGateUpBlocksPerTask * kGateUpBlock;
    const int64_t c1 = 2 * std::min((task + 1) * kGateUpBlocksPerTask * kGateUpBlock, I);
    MatMulT(w.gx.data() + off * H, H, ew.gate_up + c0 * H, H, n, c1 - c0, H,
            w.gu.data() + off * ld + c0, ld);
  });
  pool.ParallelFor(static_cast<int64_t>(w.down_tasks.size()), [&](int64_t i) {
    const auto [e, task] = w.down_tasks[i];
    const ExpertFfnWeights& ew = experts[e];
    const int64_t off = w.plan.expert_offsets[e], n = w.plan.rows_of(static_cast<int>(e));
    const int64_t c0 = task * kDownColsPerTask, c1 = std::min(H, c0 + kDownColsPerTask);
    MatMulT(w.h.data() + off * I, I, ew.down + c0 * I, I, n, c1 - c0, I, w.gy.data() + off * H + c0,
            H);
  });
}

std::string Fixed(double v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.4f", v);
  return buf;
}

absl::Status BenchOne(const BenchOptions& o, MoeLayer& layer, const MoeModelConfig& c,
                      const GateWeights& gate, const std::vector<ExpertFfnWeights>& experts,
                      ThreadPool& pool, int64_t T) {
  const int64_t H = c.hidden_size, E = c.num_experts, k = c.top_k;
  ASSIGN_OR_RETURN(Tensor x, InputFor(o, gate, c, T));

  // One untimed Forward gives the routing whose row counts the GEMM-only loop reuses.
  ASSIGN_OR_RETURN(MoeLayerOutput ref, layer.Forward(x));
  if (!o.output_dir.empty()) {
    fs::create_directories(o.output_dir);
    RETURN_IF_ERROR(WriteSafetensors(
        (fs::path(o.output_dir) / absl::StrCat("output_T", T, ".safetensors")).string(),
        {{"output", ref.output}, {"topk_ids", ref.topk_ids}, {"topk_weights", ref.topk_weights}}));
  }
  Workspace w;
  BuildTokenChoicePlan(ref.topk_ids.data<int32_t>(), ref.topk_weights.data<float>(), T,
                       static_cast<int>(k), static_cast<int>(E), -1, &w.plan);
  const int64_t rows = w.plan.num_rows();
  std::vector<int64_t> rows_per_expert(E);
  for (int64_t e = 0; e < E; ++e) {
    rows_per_expert[e] = w.plan.rows_of(static_cast<int>(e));
    if (rows_per_expert[e] == 0) continue;
    for (int64_t t = 0; t < NumGateUpTasks(experts[e]); ++t) w.gate_up_tasks.push_back({e, t});
    for (int64_t t = 0; t < NumDownTasks(experts[e]); ++t) w.down_tasks.push_back({e, t});
  }
  w.logits.assign(T * E, 0.0f);
  w.gx.assign(rows * H, 0.0f);
  w.gy.assign(rows * H, 0.0f);
  w.gu.assign(GateUpScratch(experts[0], rows), 0.0f);
  w.h.assign(HiddenScratch(experts[0], rows), 0.1f);
  GatherRows(x.data<float>(), H, w.plan, 0, rows, w.gx.data());  // real activations

  std::vector<double> layer_ms, gemm_ms;
  for (int64_t r = -o.warmup; r < o.repeats; ++r) {
    auto t0 = Clock::now();
    auto out = layer.Forward(x);
    const double l = MsSince(t0);
    if (!out.ok()) return out.status();
    t0 = Clock::now();
    GemmsOnly(x.data<float>(), T, c, gate, experts, pool, w);
    const double g = MsSince(t0);
    if (r < 0) continue;
    layer_ms.push_back(l);
    gemm_ms.push_back(g);
  }

  const double lm = Median(layer_ms), gm = Median(gemm_ms);
  std::printf(
      "{\"T\":%lld,\"layer_ms_median\":%s,\"layer_ms_min\":%s,\"gemm_ms_median\":%s,"
      "\"gemm_ms_min\":%s,\"overhead_ratio\":%s,\"repeats\":%lld,\"threads\":%d,"
      "\"rows_per_expert\":[%s]}\n",
      (long long)T, Fixed(lm).c_str(), Fixed(Min(layer_ms)).c_str(), Fixed(gm).c_str(),
      Fixed(Min(gemm_ms)).c_str(), Fixed(lm / gm).c_str(), (long long)o.repeats, pool.size(),
      absl::StrJoin(rows_per_expert, ",").c_str());
  std::fflush(stdout);
  return absl::OkStatus();
}

absl::Status Run(int argc, char** argv) {
  ASSIGN_OR_RETURN(BenchOptions o, ParseFlags(argc, argv));
  ASSIGN_OR_RETURN(std::string dir, ModelDir(o));
  ASSIGN_OR_RETURN(auto ckpt, Checkpoint::Open(dir));
  ASSIGN_OR_RETURN(MoeModelConfig c, ParseMoeModelConfig(ckpt->config()));
  int64_t layer = o.layer;
  if (layer < 0) {
    const std::vector<int64_t> moe = c.MoeLayers();
    if (moe.empty()) return absl::InvalidArgumentError(absl::StrCat(dir, " has no MoE layer"));
    layer = moe.front();
  }
  // The GEMM-only loop covers the Mixtral-like block: no router bias, no
  // correction bias, no expert biases, no shared expert.
  ASSIGN_OR_RETURN(GateWeights gate, LoadGate(*ckpt, c, layer));
  if (gate.bias.raw() != nullptr || gate.correction_bias.raw() != nullptr ||
      c.shared_intermediate > 0) {
    return absl::UnimplementedError(
        "the GEMM-only breakdown covers blocks without router biases or shared experts");
  }
  ThreadPool& pool = ThreadPool::Default();
  MoeLayerOptions options;
  options.pool = &pool;
  ASSIGN_OR_RETURN(auto moe, MoeLayer::Create(*ckpt, c, layer, options));
  std::vector<ExpertFfnWeights> experts;
  for (int64_t e = 0; e < c.num_experts; ++e) {
    experts.push_back(moe->expert(e).View(c));  // the layer's own weight buffers
    if (experts.back().gate_up_bias != nullptr || experts.back().down_bias != nullptr) {
      return absl::UnimplementedError("the GEMM-only breakdown covers experts without biases");
    }
  }
  std::fprintf(
      stderr, "model %s layer %lld: H=%lld I=%lld E=%lld k=%lld; OpenBLAS %s; %d threads\n",
      dir.c_str(), (long long)layer, (long long)c.hidden_size, (long long)c.expert_intermediate,
      (long long)c.num_experts, (long long)c.top_k, openblas_get_config(), pool.size());
  for (int64_t T : o.tokens) RETURN_IF_ERROR(BenchOne(o, *moe, c, gate, experts, pool, T));
  return absl::OkStatus();
}

}  // namespace
}  // namespace moemesh

int main(int argc, char** argv) {
  moemesh::ConfigureForServing();  // as the services run the same layer
  for (int i = 1; i < argc; ++i) {
    if (std::string(argv[i]) == "--help" || std::string(argv[i]) == "-h") {
      std::fputs(moemesh::kUsage, stdout);
      return 0;
    }
  }
  const absl::Status st = moemesh::Run(argc, argv);
  if (!st.ok()) {
    std::fprintf(stderr, "moe_layer_bench: %s\n%s", std::string(st.ToString()).c_str(),
                 moemesh::kUsage);
    return 1;
  }
  return 0;
}
