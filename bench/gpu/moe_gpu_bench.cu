// GPU MoE benchmark of issue 4: this repository's CUDA kernels (kernels/cuda/) at real model
// sizes on one H100/H200, the counterpart of bench/gpu/hf_moe_bench.py (Hugging Face's blocks)
// with the same shapes, weights' statistics, timing method and JSON fields, so the two outputs
// join on (shape, part, T). bench/gpu/run_gpu_bench.sh runs both and prints the comparison.
//
// Shapes (--shapes): mixtral (H=4096 I=14336 E=8 k=2, softmax top-k, renormalised), qwen3
// (H=2048 I=768 E=128 k=8, softmax, norm_topk_prob) and deepseek_v3 (H=7168 I=2048 E=256 k=8,
// sigmoid + correction bias, 8 groups / 4 chosen by top-2 sums, normalised, x2.5, plus one
// shared expert of I=2048 run by the same grouped FFN as a single expert over all T rows).
// Weights: BF16, fresh random N(0, 1/fan_in) (router included; DeepSeek's correction bias
// 0.01·N(0,1) in FP32, as hf_moe_bench.py), generated on the GPU, in GroupedFfnWeights' stacked
// layout. Hidden states: 4 random BF16 input sets [T, H] per T, rotated between calls.
//
// Parts, for each T of --tokens:
//   experts           GroupedGateUpAct + GroupedDown on rows already grouped (the permutation
//                     and the gathered rows built once, untimed, from the routing the router
//                     chose for each input set);
//   experts_dispatch  what HF's experts module does with (x, top-k ids, top-k weights):
//                     BuildPermutation, GatherRows, the grouped FFN, CombineRows;
//   layer             the whole MoE layer: RouterLogits (cuBLAS), RouteTopK, BuildPermutation,
//                     GatherRows, the grouped FFN, CombineRows (+ the shared expert, added);
//   layer_graph       the same launches captured once per input set in a CUDA graph, replayed.
// Timing is hf_moe_bench.py's (triton's do_bench): a call, 5 calls for an estimate, calls for
// --warmup-ms, then max(5, --rep-ms / estimate) calls each between its own pair of CUDA
// events; the median is reported.
//
// Ceilings measured in the same run: cublasGemmEx 8192³ BF16 in/out, FP32 compute (TFLOP/s),
// and a 1 GiB device-to-device cudaMemcpyAsync (bytes read + written, GB/s).
//
// Check, per shape, at T = 64: the layer's output for 4 tokens against a double-precision
// CPU computation from the same BF16 weights and inputs, with the routing the GPU chose (its
// logits and top-k weights are checked too: logits against a double product, ids and weights
// against the CPU RouteTopK on the GPU's logits); and the graph replay against the eager run.
// The run exits 1 if the layer's relative error is over 1e-2 or not finite, or any CUDA or
// cuBLAS call fails.
//
// Output (stdout and --out FILE), one JSON object a line:
//   {"device": name, "sm": 90, ...}
//   {"ceiling": "matmul_bf16_tflops", "value": ..}   {"ceiling": "d2d_copy_gbs", "value": ..}
//   {"shape", "H", "I", "E", "k", "I_shared"}
//   {"shape", "check": "layer_vs_cpu", "T": 64, "rel_err", ...}
//   {"shape", "part", "T", "ms", "tflops", "weight_gbs", "experts_touched"}
// tflops counts 2·T·k·3·H·I (+ 2·T·3·H·I_shared in layer parts of deepseek_v3); weight_gbs is
// the BF16 bytes of the distinct experts routed to (mean over the 4 input sets; + the shared
// expert in layer parts) per second. Without a CUDA device: one line saying so, exit 0.
//
//   moe_gpu_bench [--shapes mixtral,qwen3,deepseek_v3] [--tokens 1,8,64,512,4096]
//                 [--warmup-ms 25] [--rep-ms 200] [--seed N] [--no-graph] [--out FILE]
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cinttypes>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <fstream>
#include <random>
#include <set>
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "kernels/cpu/routing.h"
#include "kernels/cpu/routing_testing.h"
#include "kernels/cuda/grouped_ffn.cuh"
#include "kernels/cuda/permute.cuh"
#include "kernels/cuda/routing.cuh"
#include "kernels/dtype.h"

namespace moemesh {
namespace {

constexpr int kInputSets = 4;     // inputs rotated between calls, as hf_moe_bench.py
constexpr int kCheckTokens = 64;  // T of the correctness check
constexpr double kMaxRelErr = 1e-2;
constexpr double kMaxLogitsRelErr = 1e-3;
constexpr size_t kCublasWorkspaceBytes = size_t{32} << 20;

// ---------------------------------------------------------------------------------------------
// Errors: every CUDA / cuBLAS status is checked; a failure throws with the call's text.

std::string Where(const char* expr, const char* file, int line) {
  std::ostringstream s;
  s << expr << " at " << file << ":" << line;
  return s.str();
}

void CheckCuda(cudaError_t e, const char* expr, const char* file, int line) {
  if (e != cudaSuccess) {
    throw std::runtime_error(std::string(cudaGetErrorName(e)) + " (" + cudaGetErrorString(e) +
                             ") from " + Where(expr, file, line));
  }
}

void CheckCublas(cublasStatus_t s, const char* expr, const char* file, int line) {
  if (s != CUBLAS_STATUS_SUCCESS) {
    throw std::runtime_error(std::string(cublasGetStatusName(s)) + " from " +
                             Where(expr, file, line));
  }
}

#define CUDA_OK(expr) CheckCuda((expr), #expr, __FILE__, __LINE__)
#define CUBLAS_OK(expr) CheckCublas((expr), #expr, __FILE__, __LINE__)
// After a launch of this file's own kernels.
#define LAUNCH_OK() CheckCuda(cudaGetLastError(), "kernel launch", __FILE__, __LINE__)

// ---------------------------------------------------------------------------------------------
// Device memory that frees itself.

template <typename T>
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  explicit DeviceBuffer(size_t n) : n_(n) {
    CUDA_OK(cudaMalloc(reinterpret_cast<void**>(&ptr_), std::max<size_t>(n, 1) * sizeof(T)));
  }
  DeviceBuffer(DeviceBuffer&& o) noexcept
      : ptr_(std::exchange(o.ptr_, nullptr)), n_(std::exchange(o.n_, 0)) {}
  DeviceBuffer& operator=(DeviceBuffer&& o) noexcept {
    if (this != &o) {
      Reset();
      ptr_ = std::exchange(o.ptr_, nullptr);
      n_ = std::exchange(o.n_, 0);
    }
    return *this;
  }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  ~DeviceBuffer() { Reset(); }

  void Reset() {
    if (ptr_ != nullptr) cudaFree(ptr_);  // nothing to do about a failure while freeing
    ptr_ = nullptr;
    n_ = 0;
  }
  T* get() const { return ptr_; }
  size_t size() const { return n_; }
  size_t bytes() const { return n_ * sizeof(T); }

  std::vector<T> Download(size_t offset, size_t count) const {
    std::vector<T> h(count);
    if (count > 0)
      CUDA_OK(cudaMemcpy(h.data(), ptr_ + offset, count * sizeof(T), cudaMemcpyDeviceToHost));
    return h;
  }
  std::vector<T> Download() const { return Download(0, n_); }

 private:
  T* ptr_ = nullptr;
  size_t n_ = 0;
};

// ---------------------------------------------------------------------------------------------
// This file's own kernels: random fill (counter-based, so no state and any size) and the
// shared expert's add.

__device__ __forceinline__ uint64_t SplitMix64(uint64_t z) {
  z += 0x9e3779b97f4a7c15ull;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

// N(0, stddev) by Box-Muller from one 64-bit hash of (seed, i): 24-bit uniforms, u1 in (0, 1].
__device__ __forceinline__ float Normal(uint64_t seed, int64_t i, float stddev) {
  const uint64_t r = SplitMix64(seed ^ SplitMix64(static_cast<uint64_t>(i)));
  const float u1 = (static_cast<float>(r >> 40) + 1.0f) * (1.0f / 16777216.0f);
  const float u2 = static_cast<float>(r & 0xffffffu) * (1.0f / 16777216.0f);
  return stddev * sqrtf(-2.0f * logf(u1)) * cospif(2.0f * u2);
}

__global__ void FillNormalBf16(uint16_t* __restrict__ out, int64_t n, float stddev, uint64_t seed) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x) {
    const float v = Normal(seed, i, stddev);
    out[i] = __bfloat16_as_ushort(__float2bfloat16_rn(v));
  }
}

__global__ void FillNormalF32(float* __restrict__ out, int64_t n, float stddev, uint64_t seed) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x) {
    out[i] = Normal(seed, i, stddev);
  }
}

__global__ void AddInto(float* __restrict__ out, const float* __restrict__ add, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x) {
    out[i] += add[i];
  }
}

unsigned GridFor(int64_t n) {
  return static_cast<unsigned>(std::clamp<int64_t>((n + 255) / 256, 1, 8192));
}

uint64_t g_seed = 0;
uint64_t g_tensor = 0;  // every random tensor gets its own stream of numbers

uint64_t NextSeed() {
  uint64_t z = g_seed + 0x9e3779b97f4a7c15ull * ++g_tensor;
  z = (z ^ (z >> 31)) * 0x7fb5d329728ea185ull;
  return z ^ (z >> 27);
}

void RandomBf16(DeviceBuffer<uint16_t>& buf, float stddev, cudaStream_t stream) {
  const int64_t n = static_cast<int64_t>(buf.size());
  FillNormalBf16<<<GridFor(n), 256, 0, stream>>>(buf.get(), n, stddev, NextSeed());
  LAUNCH_OK();
}

void RandomF32(DeviceBuffer<float>& buf, float stddev, cudaStream_t stream) {
  const int64_t n = static_cast<int64_t>(buf.size());
  FillNormalF32<<<GridFor(n), 256, 0, stream>>>(buf.get(), n, stddev, NextSeed());
  LAUNCH_OK();
}

// ---------------------------------------------------------------------------------------------
// Output: JSON lines on stdout and in --out.

std::ofstream g_out_file;

void Emit(const std::string& line) {
  std::fputs(line.c_str(), stdout);
  std::fputc('\n', stdout);
  std::fflush(stdout);
  if (g_out_file.is_open()) {
    g_out_file << line << '\n';
    g_out_file.flush();
  }
}

std::string Str(const std::string& s) {
  std::string r = "\"";
  for (char c : s) {
    if (c == '"' || c == '\\') {
      r += '\\';
      r += c;
    } else if (static_cast<unsigned char>(c) < 0x20) {
      r += ' ';
    } else {
      r += c;
    }
  }
  return r + "\"";
}

// A number with `digits` decimals (%g when digits < 0); null when not finite.
std::string Num(double v, int digits) {
  if (!std::isfinite(v)) return "null";
  char buf[64];
  if (digits < 0) {
    std::snprintf(buf, sizeof buf, "%.6g", v);
  } else {
    std::snprintf(buf, sizeof buf, "%.*f", digits, v);
  }
  return buf;
}

// ---------------------------------------------------------------------------------------------
// Timing, as hf_moe_bench.py's bench_ms (triton.testing.do_bench): median ms of fn(i).

template <typename Fn>
double BenchMs(Fn&& fn, cudaStream_t stream, double warmup_ms, double rep_ms) {
  fn(0);
  CUDA_OK(cudaStreamSynchronize(stream));
  cudaEvent_t start, end;
  CUDA_OK(cudaEventCreate(&start));
  CUDA_OK(cudaEventCreate(&end));
  CUDA_OK(cudaEventRecord(start, stream));
  for (int i = 0; i < 5; ++i) fn(i);
  CUDA_OK(cudaEventRecord(end, stream));
  CUDA_OK(cudaEventSynchronize(end));
  float total = 0.0f;
  CUDA_OK(cudaEventElapsedTime(&total, start, end));
  CUDA_OK(cudaEventDestroy(start));
  CUDA_OK(cudaEventDestroy(end));
  const double estimate = std::max(static_cast<double>(total) / 5.0, 1e-3);
  const int warmup = std::max(1, static_cast<int>(warmup_ms / estimate));
  for (int i = 0; i < warmup; ++i) fn(i);
  const int reps = std::clamp(static_cast<int>(rep_ms / estimate), 5, 100000);
  std::vector<cudaEvent_t> before(reps), after(reps);
  for (int i = 0; i < reps; ++i) {
    CUDA_OK(cudaEventCreate(&before[i]));
    CUDA_OK(cudaEventCreate(&after[i]));
  }
  for (int i = 0; i < reps; ++i) {
    CUDA_OK(cudaEventRecord(before[i], stream));
    fn(i);
    CUDA_OK(cudaEventRecord(after[i], stream));
  }
  CUDA_OK(cudaStreamSynchronize(stream));
  std::vector<double> ms(reps);
  for (int i = 0; i < reps; ++i) {
    float t = 0.0f;
    CUDA_OK(cudaEventElapsedTime(&t, before[i], after[i]));
    ms[i] = t;
    CUDA_OK(cudaEventDestroy(before[i]));
    CUDA_OK(cudaEventDestroy(after[i]));
  }
  std::sort(ms.begin(), ms.end());
  return reps % 2 == 1 ? ms[reps / 2] : 0.5 * (ms[reps / 2 - 1] + ms[reps / 2]);
}

double Tflops(double flops, double ms) { return flops / ms / 1e9; }
double Gbs(double bytes, double ms) { return bytes / ms / 1e6; }

// ---------------------------------------------------------------------------------------------
// Shapes.

struct Shape {
  std::string name;
  int64_t H, I;
  int E, k;
  RoutingParams routing;
  bool correction_bias;
  int64_t I_shared;  // 0: no shared expert
};

std::vector<Shape> AllShapes() {
  return {
      {"mixtral", 4096, 14336, 8, 2, MakeRouting(8, 2, Scoring::kSoftmax, true), false, 0},
      {"qwen3", 2048, 768, 128, 8, MakeRouting(128, 8, Scoring::kSoftmax, true), false, 0},
      // HF DeepseekV3: sigmoid, + e_score_correction_bias for choosing, groups by the sum of
      // their top-2, weights / (sum + 1e-20) · routed_scaling_factor.
      {"deepseek_v3", 7168, 2048, 256, 8,
       MakeRouting(256, 8, Scoring::kSigmoid, true, 2.5f, 8, 4, GroupScore::kTop2Sum, 1e-20f), true,
       2048},
  };
}

// ---------------------------------------------------------------------------------------------
// One shape's weights, resident on the GPU.

struct Model {
  Shape shape;
  DeviceBuffer<uint16_t> gate_up, down;                // [E, 2I, H], [E, H, I]
  DeviceBuffer<uint16_t> router;                       // [E, H]
  DeviceBuffer<float> correction_bias;                 // [E] or empty
  DeviceBuffer<uint16_t> shared_gate_up, shared_down;  // [1, 2Is, H], [1, H, Is]
  cuda::GroupedFfnWeights experts, shared;

  Model(const Shape& s, cudaStream_t stream) : shape(s) {
    const int64_t H = s.H, I = s.I, E = s.E;
    gate_up = DeviceBuffer<uint16_t>(static_cast<size_t>(E * 2 * I * H));
    down = DeviceBuffer<uint16_t>(static_cast<size_t>(E * H * I));
    router = DeviceBuffer<uint16_t>(static_cast<size_t>(E * H));
    RandomBf16(gate_up, 1.0f / std::sqrt(static_cast<float>(H)), stream);  // fan_in = H
    RandomBf16(down, 1.0f / std::sqrt(static_cast<float>(I)), stream);     // fan_in = I
    RandomBf16(router, 1.0f / std::sqrt(static_cast<float>(H)), stream);
    if (s.correction_bias) {
      correction_bias = DeviceBuffer<float>(static_cast<size_t>(E));
      RandomF32(correction_bias, 0.01f, stream);
    }
    experts.num_experts = s.E;
    experts.hidden = H;
    experts.intermediate = I;
    experts.activation = Activation::kSwiGlu;
    experts.gate_up = gate_up.get();
    experts.down = down.get();
    if (s.I_shared > 0) {
      const int64_t Is = s.I_shared;
      shared_gate_up = DeviceBuffer<uint16_t>(static_cast<size_t>(2 * Is * H));
      shared_down = DeviceBuffer<uint16_t>(static_cast<size_t>(H * Is));
      RandomBf16(shared_gate_up, 1.0f / std::sqrt(static_cast<float>(H)), stream);
      RandomBf16(shared_down, 1.0f / std::sqrt(static_cast<float>(Is)), stream);
      shared.num_experts = 1;
      shared.hidden = H;
      shared.intermediate = Is;
      shared.activation = Activation::kSwiGlu;
      shared.gate_up = shared_gate_up.get();
      shared.down = shared_down.get();
    }
    CUDA_OK(cudaStreamSynchronize(stream));
  }
};

// ---------------------------------------------------------------------------------------------
// One T's buffers: inputs, the layer's intermediates, and per input set the routing and
// grouped rows the "experts" parts start from.

struct Buffers {
  int64_t T = 0;
  std::vector<DeviceBuffer<uint16_t>> x;  // kInputSets × [T, H] BF16
  DeviceBuffer<float> logits;             // [T, E]
  DeviceBuffer<int32_t> ids;              // [T, k]
  DeviceBuffer<float> weights;            // [T, k]
  DeviceBuffer<int64_t> offsets;          // [E+1]
  DeviceBuffer<int32_t> row_token, slot_row;
  DeviceBuffer<unsigned char> workspace;
  DeviceBuffer<uint16_t> xg;             // [T·k, H] grouped rows
  DeviceBuffer<uint16_t> h;              // [T·k, I]
  DeviceBuffer<float> y;                 // [T·k, H]
  DeviceBuffer<float> out;               // [T, H]
  DeviceBuffer<int64_t> shared_offsets;  // {0, T}
  DeviceBuffer<uint16_t> shared_h;       // [T, Is]
  DeviceBuffer<float> shared_y;          // [T, H]
  // Per input set, made once, untimed.
  std::vector<DeviceBuffer<int32_t>> set_ids;
  std::vector<DeviceBuffer<float>> set_weights;
  std::vector<DeviceBuffer<int64_t>> set_offsets;
  std::vector<DeviceBuffer<uint16_t>> set_xg;
  std::vector<int> set_touched;  // distinct experts routed to

  cuda::DevicePermutation Perm() const { return {offsets.get(), row_token.get(), slot_row.get()}; }
};

Buffers MakeBuffers(const Shape& s, int64_t T, cudaStream_t stream) {
  Buffers b;
  b.T = T;
  const size_t H = static_cast<size_t>(s.H), I = static_cast<size_t>(s.I),
               E = static_cast<size_t>(s.E);
  const size_t rows = static_cast<size_t>(T) * static_cast<size_t>(s.k), t = static_cast<size_t>(T);
  for (int i = 0; i < kInputSets; ++i) {
    b.x.emplace_back(t * H);
    RandomBf16(b.x.back(), 1.0f, stream);
  }
  b.logits = DeviceBuffer<float>(t * E);
  b.ids = DeviceBuffer<int32_t>(rows);
  b.weights = DeviceBuffer<float>(rows);
  b.offsets = DeviceBuffer<int64_t>(E + 1);
  b.row_token = DeviceBuffer<int32_t>(rows);
  b.slot_row = DeviceBuffer<int32_t>(rows);
  b.workspace =
      DeviceBuffer<unsigned char>(cuda::PermutationWorkspaceBytes(static_cast<int64_t>(rows), s.E));
  b.xg = DeviceBuffer<uint16_t>(rows * H);
  b.h = DeviceBuffer<uint16_t>(rows * I);
  b.y = DeviceBuffer<float>(rows * H);
  b.out = DeviceBuffer<float>(t * H);
  if (s.I_shared > 0) {
    const std::vector<int64_t> so = {0, T};
    b.shared_offsets = DeviceBuffer<int64_t>(2);
    CUDA_OK(
        cudaMemcpy(b.shared_offsets.get(), so.data(), sizeof(int64_t) * 2, cudaMemcpyHostToDevice));
    b.shared_h = DeviceBuffer<uint16_t>(t * static_cast<size_t>(s.I_shared));
    b.shared_y = DeviceBuffer<float>(t * H);
  }
  CUDA_OK(cudaStreamSynchronize(stream));
  return b;
}

struct Context {
  cudaStream_t stream = nullptr;
  cublasHandle_t cublas = nullptr;
};

// ---------------------------------------------------------------------------------------------
// The launches of each part; no host synchronisation inside any of them.

void Route(const Context& c, const Model& m, const uint16_t* x, int64_t T, Buffers& b, int32_t* ids,
           float* weights) {
  const Shape& s = m.shape;
  CUBLAS_OK(cuda::RouterLogits(c.cublas, cuda::RouterDType::kBF16, x, m.router.get(), nullptr, T,
                               s.H, s.E, b.logits.get()));
  CUDA_OK(cuda::RouteTopK(s.routing, b.logits.get(), T,
                          s.correction_bias ? m.correction_bias.get() : nullptr, ids, weights,
                          nullptr, c.stream));
}

// Grouped FFN over rows grouped by `offsets`: xg -> b.y.
void Ffn(const Context& c, const Model& m, const uint16_t* xg, const int64_t* offsets, int64_t rows,
         Buffers& b) {
  CUDA_OK(cuda::GroupedGateUpAct(m.experts, xg, offsets, rows, b.h.get(), c.stream));
  CUDA_OK(cuda::GroupedDown(m.experts, b.h.get(), offsets, rows, b.y.get(), c.stream));
}

// x, ids, weights -> b.out (routed experts only), as HF's experts module.
void Dispatch(const Context& c, const Model& m, const uint16_t* x, const int32_t* ids,
              const float* weights, Buffers& b) {
  const Shape& s = m.shape;
  const int64_t rows = b.T * s.k;
  CUDA_OK(cuda::BuildPermutation(ids, b.T, s.k, s.E, b.workspace.get(), b.workspace.bytes(),
                                 b.Perm(), c.stream));
  CUDA_OK(cuda::GatherRows(cuda::RowDType::kBF16, x, s.H, b.row_token.get(), rows, b.xg.get(),
                           c.stream));
  Ffn(c, m, b.xg.get(), b.offsets.get(), rows, b);
  CUDA_OK(cuda::CombineRows(cuda::RowDType::kF32, b.y.get(), s.H, b.slot_row.get(), weights, b.T,
                            s.k, b.out.get(), c.stream));
}

void Layer(const Context& c, const Model& m, int set, Buffers& b) {
  const Shape& s = m.shape;
  const uint16_t* x = b.x[set].get();
  Route(c, m, x, b.T, b, b.ids.get(), b.weights.get());
  Dispatch(c, m, x, b.ids.get(), b.weights.get(), b);
  if (s.I_shared > 0) {
    CUDA_OK(cuda::GroupedGateUpAct(m.shared, x, b.shared_offsets.get(), b.T, b.shared_h.get(),
                                   c.stream));
    CUDA_OK(cuda::GroupedDown(m.shared, b.shared_h.get(), b.shared_offsets.get(), b.T,
                              b.shared_y.get(), c.stream));
    const int64_t n = b.T * s.H;
    AddInto<<<GridFor(n), 256, 0, c.stream>>>(b.out.get(), b.shared_y.get(), n);
    LAUNCH_OK();
  }
}

// Per input set, untimed: the router's choice, its permutation and grouped rows.
void PrepareSets(const Context& c, const Model& m, Buffers& b) {
  const Shape& s = m.shape;
  const size_t rows = static_cast<size_t>(b.T) * static_cast<size_t>(s.k);
  for (int i = 0; i < kInputSets; ++i) {
    b.set_ids.emplace_back(rows);
    b.set_weights.emplace_back(rows);
    b.set_offsets.emplace_back(static_cast<size_t>(s.E) + 1);
    b.set_xg.emplace_back(rows * static_cast<size_t>(s.H));
    Route(c, m, b.x[i].get(), b.T, b, b.set_ids[i].get(), b.set_weights[i].get());
    CUDA_OK(cuda::BuildPermutation(b.set_ids[i].get(), b.T, s.k, s.E, b.workspace.get(),
                                   b.workspace.bytes(), b.Perm(), c.stream));
    CUDA_OK(cuda::GatherRows(cuda::RowDType::kBF16, b.x[i].get(), s.H, b.row_token.get(),
                             static_cast<int64_t>(rows), b.set_xg[i].get(), c.stream));
    CUDA_OK(cudaMemcpyAsync(b.set_offsets[i].get(), b.offsets.get(), b.set_offsets[i].bytes(),
                            cudaMemcpyDeviceToDevice, c.stream));
    CUDA_OK(cudaStreamSynchronize(c.stream));
    const std::vector<int32_t> ids = b.set_ids[i].Download();
    std::set<int32_t> distinct;
    for (int32_t e : ids) {
      if (e < 0 || e >= s.E)
        throw std::runtime_error("RouteTopK returned expert id " + std::to_string(e));
      distinct.insert(e);
    }
    b.set_touched.push_back(static_cast<int>(distinct.size()));
  }
}

// ---------------------------------------------------------------------------------------------
// CUDA graphs of the layer, one per input set.

struct Graphs {
  std::vector<cudaGraphExec_t> exec;
  Graphs() = default;
  Graphs(const Graphs&) = delete;
  Graphs& operator=(const Graphs&) = delete;
  ~Graphs() {
    for (cudaGraphExec_t e : exec) cudaGraphExecDestroy(e);
  }
};

// Captures Layer() for every input set; an error text instead when capture fails.
std::string CaptureLayer(const Context& c, const Model& m, Buffers& b, Graphs* graphs) {
  for (int i = 0; i < kInputSets; ++i) {
    cudaGraph_t graph = nullptr;
    CUDA_OK(cudaStreamBeginCapture(c.stream, cudaStreamCaptureModeThreadLocal));
    std::string error;
    try {
      Layer(c, m, i, b);
    } catch (const std::exception& e) {
      error = e.what();
    }
    const cudaError_t end = cudaStreamEndCapture(c.stream, &graph);
    if (error.empty() && end != cudaSuccess)
      error = std::string("cudaStreamEndCapture: ") + cudaGetErrorString(end);
    if (!error.empty()) {
      if (graph != nullptr) cudaGraphDestroy(graph);
      (void)cudaGetLastError();  // a failed capture's error is not sticky
      return error;
    }
    cudaGraphExec_t exec = nullptr;
    const cudaError_t inst = cudaGraphInstantiate(&exec, graph, 0);
    cudaGraphDestroy(graph);
    if (inst != cudaSuccess) {
      (void)cudaGetLastError();
      return std::string("cudaGraphInstantiate: ") + cudaGetErrorString(inst);
    }
    graphs->exec.push_back(exec);
  }
  return "";
}

// ---------------------------------------------------------------------------------------------
// The correctness check at T = 64.

double Silu(double g) { return g / (1.0 + std::exp(-g)); }

// y += scale · down(silu(gate x) · up(x)) for one expert in double; gu [2I, H], dn [H, I] BF16.
void ExpertRef(const std::vector<uint16_t>& gu, const std::vector<uint16_t>& dn, int64_t H,
               int64_t I, const std::vector<double>& x, double scale, std::vector<double>* y) {
  std::vector<double> h(static_cast<size_t>(I));
  for (int64_t i = 0; i < I; ++i) {
    const uint16_t* g = gu.data() + i * H;
    const uint16_t* u = gu.data() + (I + i) * H;
    double gs = 0.0, us = 0.0;
    for (int64_t c = 0; c < H; ++c) {
      gs += x[c] * Bf16ToF32(g[c]);
      us += x[c] * Bf16ToF32(u[c]);
    }
    h[i] = Silu(gs) * us;
  }
  for (int64_t c = 0; c < H; ++c) {
    const uint16_t* d = dn.data() + c * I;
    double acc = 0.0;
    for (int64_t i = 0; i < I; ++i) acc += h[i] * Bf16ToF32(d[i]);
    (*y)[c] += scale * acc;
  }
}

// Returns false when the check fails.
bool CheckLayer(const Context& c, const Model& m, bool with_graph) {
  const Shape& s = m.shape;
  const int64_t T = kCheckTokens, H = s.H, I = s.I, E = s.E;
  const int k = s.k;
  Buffers b = MakeBuffers(s, T, c.stream);
  Layer(c, m, 0, b);
  CUDA_OK(cudaStreamSynchronize(c.stream));
  const std::vector<float> out = b.out.Download();
  const std::vector<float> logits = b.logits.Download();
  const std::vector<int32_t> ids = b.ids.Download();
  const std::vector<float> weights = b.weights.Download();
  const std::vector<uint16_t> x = b.x[0].Download();
  const std::vector<uint16_t> router = m.router.Download();
  const std::vector<float> bias =
      s.correction_bias ? m.correction_bias.Download() : std::vector<float>();

  const std::vector<int64_t> tokens = {0, 21, 42, 63};
  const int64_t n = static_cast<int64_t>(tokens.size());
  std::vector<std::vector<double>> xs(n, std::vector<double>(H)),
      ref(n, std::vector<double>(H, 0.0));
  for (int64_t j = 0; j < n; ++j) {
    for (int64_t col = 0; col < H; ++col) xs[j][col] = Bf16ToF32(x[tokens[j] * H + col]);
  }

  // Router logits against a double product; the CPU routing of the GPU's logits.
  double lg_err = 0.0, lg_norm = 0.0;
  std::vector<float> tok_logits(n * E);
  for (int64_t j = 0; j < n; ++j) {
    for (int64_t e = 0; e < E; ++e) {
      double acc = 0.0;
      for (int64_t col = 0; col < H; ++col) acc += xs[j][col] * Bf16ToF32(router[e * H + col]);
      const double got = logits[tokens[j] * E + e];
      lg_err += (got - acc) * (got - acc);
      lg_norm += acc * acc;
      tok_logits[j * E + e] = logits[tokens[j] * E + e];
    }
  }
  const double logits_rel_err = std::sqrt(lg_err / lg_norm);
  std::vector<int32_t> cpu_ids(n * k);
  std::vector<float> cpu_w(n * k);
  RouteTopK(s.routing, tok_logits.data(), n, s.correction_bias ? bias.data() : nullptr,
            cpu_ids.data(), cpu_w.data(), nullptr);
  bool ids_match = true;
  double w_err = 0.0;
  for (int64_t j = 0; j < n; ++j) {
    for (int q = 0; q < k; ++q) {
      ids_match &= cpu_ids[j * k + q] == ids[tokens[j] * k + q];
      w_err = std::max(
          w_err, std::abs(static_cast<double>(cpu_w[j * k + q]) - weights[tokens[j] * k + q]));
    }
  }

  // The routed experts, each downloaded once, with the GPU's ids and weights.
  std::set<int32_t> experts;
  for (int64_t j = 0; j < n; ++j) {
    for (int q = 0; q < k; ++q) experts.insert(ids[tokens[j] * k + q]);
  }
  for (int32_t e : experts) {
    if (e < 0 || e >= E) throw std::runtime_error("routed to expert id " + std::to_string(e));
    const std::vector<uint16_t> gu =
        m.gate_up.Download(static_cast<size_t>(e) * 2 * I * H, 2 * I * H);
    const std::vector<uint16_t> dn = m.down.Download(static_cast<size_t>(e) * H * I, H * I);
    for (int64_t j = 0; j < n; ++j) {
      for (int q = 0; q < k; ++q) {
        if (ids[tokens[j] * k + q] == e)
          ExpertRef(gu, dn, H, I, xs[j], weights[tokens[j] * k + q], &ref[j]);
      }
    }
  }
  if (s.I_shared > 0) {
    const std::vector<uint16_t> gu = m.shared_gate_up.Download();
    const std::vector<uint16_t> dn = m.shared_down.Download();
    for (int64_t j = 0; j < n; ++j) ExpertRef(gu, dn, H, s.I_shared, xs[j], 1.0, &ref[j]);
  }
  double err = 0.0, norm = 0.0;
  for (int64_t j = 0; j < n; ++j) {
    for (int64_t col = 0; col < H; ++col) {
      const double d = static_cast<double>(out[tokens[j] * H + col]) - ref[j][col];
      err += d * d;
      norm += ref[j][col] * ref[j][col];
    }
  }
  const double rel_err = std::sqrt(err / norm);
  const bool ok = std::isfinite(rel_err) && rel_err <= kMaxRelErr &&
                  std::isfinite(logits_rel_err) && logits_rel_err <= kMaxLogitsRelErr;
  Emit("{\"shape\": " + Str(s.name) + ", \"check\": \"layer_vs_cpu\", \"T\": " + std::to_string(T) +
       ", \"tokens_checked\": " + std::to_string(n) + ", \"rel_err\": " + Num(rel_err, -1) +
       ", \"logits_rel_err\": " + Num(logits_rel_err, -1) + ", \"routing_ids_match_cpu\": " +
       (ids_match ? "true" : "false") + ", \"routing_weights_max_abs_err\": " + Num(w_err, -1) +
       ", \"ok\": " + (ok ? "true" : "false") + "}");
  if (!ids_match) {
    std::fprintf(
        stderr,
        "warning: %s: the GPU's top-k ids differ from the CPU RouteTopK on the same logits\n",
        s.name.c_str());
  }

  if (with_graph) {  // the graph's replay against the eager run, input set 0
    Graphs graphs;
    const std::string error = CaptureLayer(c, m, b, &graphs);
    if (!error.empty()) {
      Emit("{\"shape\": " + Str(s.name) + ", \"check\": \"graph_vs_eager\", \"T\": " +
           std::to_string(T) + ", \"error\": " + Str(error) + "}");
    } else {
      CUDA_OK(cudaMemsetAsync(b.out.get(), 0xff, b.out.bytes(), c.stream));
      CUDA_OK(cudaGraphLaunch(graphs.exec[0], c.stream));
      CUDA_OK(cudaStreamSynchronize(c.stream));
      const std::vector<float> replay = b.out.Download();
      double diff = 0.0;
      for (size_t i = 0; i < out.size(); ++i) {
        const double d = std::abs(static_cast<double>(replay[i]) - out[i]);
        diff = std::isnan(d) ? d : std::max(diff, d);
        if (std::isnan(d)) break;
      }
      Emit("{\"shape\": " + Str(s.name) + ", \"check\": \"graph_vs_eager\", \"T\": " +
           std::to_string(T) + ", \"max_abs_diff\": " + Num(diff, -1) + "}");
    }
  }
  return ok;
}

// ---------------------------------------------------------------------------------------------
// Ceilings.

void Ceilings(const Context& c, double warmup_ms, double rep_ms) {
  {
    const int n = 8192;
    const size_t elems = static_cast<size_t>(n) * n;
    DeviceBuffer<uint16_t> a(elems), bm(elems), cm(elems);
    RandomBf16(a, 1.0f, c.stream);
    RandomBf16(bm, 1.0f, c.stream);
    const float alpha = 1.0f, beta = 0.0f;
    const double ms = BenchMs(
        [&](int) {
          CUBLAS_OK(cublasGemmEx(c.cublas, CUBLAS_OP_N, CUBLAS_OP_N, n, n, n, &alpha, a.get(),
                                 CUDA_R_16BF, n, bm.get(), CUDA_R_16BF, n, &beta, cm.get(),
                                 CUDA_R_16BF, n, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
        },
        c.stream, warmup_ms, rep_ms);
    const double flops = 2.0 * n * static_cast<double>(n) * n;
    Emit("{\"ceiling\": \"matmul_bf16_tflops\", \"value\": " + Num(Tflops(flops, ms), 1) +
         ", \"ms\": " + Num(ms, 4) + ", \"mnk\": " + std::to_string(n) +
         ", \"impl\": \"cublasGemmEx\"}");
  }
  {
    const size_t bytes = size_t{1} << 30;
    DeviceBuffer<unsigned char> src(bytes), dst(bytes);
    CUDA_OK(cudaMemsetAsync(src.get(), 1, bytes, c.stream));
    const double ms = BenchMs(
        [&](int) {
          CUDA_OK(cudaMemcpyAsync(dst.get(), src.get(), bytes, cudaMemcpyDeviceToDevice, c.stream));
        },
        c.stream, warmup_ms, rep_ms);
    Emit("{\"ceiling\": \"d2d_copy_gbs\", \"value\": " +
         Num(Gbs(2.0 * static_cast<double>(bytes), ms), 1) + ", \"ms\": " + Num(ms, 4) +
         ", \"bytes_copied\": " + std::to_string(bytes) + ", \"impl\": \"cudaMemcpyAsync\"}");
  }
}

// ---------------------------------------------------------------------------------------------
// One shape: its check, then every T.

struct Options {
  std::vector<std::string> shapes = {"mixtral", "qwen3", "deepseek_v3"};
  std::vector<int64_t> tokens = {1, 8, 64, 512, 4096};
  double warmup_ms = 25.0;
  double rep_ms = 200.0;
  bool graph = true;
  bool seed_given = false;
  uint64_t seed = 0;
  std::string out;
};

void EmitPart(const Shape& s, const char* part, int64_t T, double ms, double touched, bool layer) {
  const double is = static_cast<double>(s.I_shared);
  const double H = static_cast<double>(s.H), I = static_cast<double>(s.I);
  double flops = 2.0 * static_cast<double>(T) * s.k * 3.0 * H * I;
  double bytes = touched * 3.0 * H * I * 2.0;
  if (layer && s.I_shared > 0) {
    flops += 2.0 * static_cast<double>(T) * 3.0 * H * is;
    bytes += 3.0 * H * is * 2.0;
  }
  Emit("{\"shape\": " + Str(s.name) + ", \"impl\": \"moemesh\", \"part\": \"" + part +
       "\", \"T\": " + std::to_string(T) + ", \"ms\": " + Num(ms, 4) + ", \"tflops\": " +
       Num(Tflops(flops, ms), 2) + ", \"weight_gbs\": " + Num(Gbs(bytes, ms), 1) +
       ", \"experts_touched\": " + Num(touched, -1) + "}");
}

bool RunShape(const Context& c, const Shape& s, const Options& o) {
  Emit("{\"shape\": " + Str(s.name) + ", \"H\": " + std::to_string(s.H) + ", \"I\": " +
       std::to_string(s.I) + ", \"E\": " + std::to_string(s.E) + ", \"k\": " + std::to_string(s.k) +
       ", \"I_shared\": " + std::to_string(s.I_shared) + ", \"expert_weight_gb\": " +
       Num(3.0 * static_cast<double>(s.H) * static_cast<double>(s.I) * 2.0 * s.E / 1e9, 2) + "}");
  Model m(s, c.stream);
  const bool ok = CheckLayer(c, m, o.graph);
  for (int64_t T : o.tokens) {
    Buffers b = MakeBuffers(s, T, c.stream);
    PrepareSets(c, m, b);
    double touched = 0.0;
    for (int t : b.set_touched) touched += t;
    touched /= kInputSets;
    const int64_t rows = T * s.k;

    double ms = BenchMs(
        [&](int i) {
          Ffn(c, m, b.set_xg[i % kInputSets].get(), b.set_offsets[i % kInputSets].get(), rows, b);
        },
        c.stream, o.warmup_ms, o.rep_ms);
    EmitPart(s, "experts", T, ms, touched, false);

    ms = BenchMs(
        [&](int i) {
          const int set = i % kInputSets;
          Dispatch(c, m, b.x[set].get(), b.set_ids[set].get(), b.set_weights[set].get(), b);
        },
        c.stream, o.warmup_ms, o.rep_ms);
    EmitPart(s, "experts_dispatch", T, ms, touched, false);

    ms = BenchMs([&](int i) { Layer(c, m, i % kInputSets, b); }, c.stream, o.warmup_ms, o.rep_ms);
    EmitPart(s, "layer", T, ms, touched, true);

    if (o.graph) {
      Graphs graphs;
      const std::string error = CaptureLayer(c, m, b, &graphs);
      if (!error.empty()) {
        Emit("{\"shape\": " + Str(s.name) +
             ", \"impl\": \"moemesh\", \"part\": \"layer_graph\", \"T\": " + std::to_string(T) +
             ", \"error\": " + Str(error) + "}");
      } else {
        ms =
            BenchMs([&](int i) { CUDA_OK(cudaGraphLaunch(graphs.exec[i % kInputSets], c.stream)); },
                    c.stream, o.warmup_ms, o.rep_ms);
        EmitPart(s, "layer_graph", T, ms, touched, true);
      }
    }
  }
  return ok;
}

std::vector<std::string> Split(const std::string& s) {
  std::vector<std::string> parts;
  std::stringstream ss(s);
  std::string item;
  while (std::getline(ss, item, ',')) {
    if (!item.empty()) parts.push_back(item);
  }
  return parts;
}

[[noreturn]] void Usage(const std::string& error) {
  std::fprintf(
      stderr,
      "%s\nusage: moe_gpu_bench [--shapes mixtral,qwen3,deepseek_v3] [--tokens 1,8,64,512,4096]\n"
      "                     [--warmup-ms 25] [--rep-ms 200] [--seed N] [--no-graph] [--out FILE]\n",
      error.c_str());
  std::exit(2);
}

Options ParseArgs(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    std::string arg = argv[i], value;
    const size_t eq = arg.find('=');
    const bool inline_value = arg.rfind("--", 0) == 0 && eq != std::string::npos;
    if (inline_value) {
      value = arg.substr(eq + 1);
      arg = arg.substr(0, eq);
    }
    auto next = [&]() -> std::string {
      if (inline_value) return value;
      if (i + 1 >= argc) Usage("missing value for " + arg);
      return argv[++i];
    };
    try {
      if (arg == "--shapes") {
        o.shapes = Split(next());
      } else if (arg == "--tokens") {
        o.tokens.clear();
        for (const std::string& t : Split(next())) {
          const long long v = std::stoll(t);
          if (v <= 0) Usage("token counts must be positive");
          o.tokens.push_back(v);
        }
      } else if (arg == "--warmup-ms") {
        o.warmup_ms = std::stod(next());
      } else if (arg == "--rep-ms") {
        o.rep_ms = std::stod(next());
      } else if (arg == "--seed") {
        o.seed = std::stoull(next());
        o.seed_given = true;
      } else if (arg == "--no-graph") {
        o.graph = false;
      } else if (arg == "--out") {
        o.out = next();
      } else if (arg == "-h" || arg == "--help") {
        Usage("GPU MoE benchmark of this repository's CUDA kernels");
      } else {
        Usage("unknown argument " + arg);
      }
    } catch (const std::logic_error&) {  // std::stoll & co.
      Usage("bad value for " + arg);
    }
  }
  const std::vector<Shape> all = AllShapes();
  for (const std::string& name : o.shapes) {
    if (std::none_of(all.begin(), all.end(), [&](const Shape& s) { return s.name == name; })) {
      Usage("unknown shape " + name + " (known: mixtral, qwen3, deepseek_v3)");
    }
  }
  return o;
}

int Main(int argc, char** argv) {
  const Options o = ParseArgs(argc, argv);
  if (!o.out.empty()) {
    g_out_file.open(o.out, std::ios::out | std::ios::trunc);
    if (!g_out_file) {
      std::fprintf(stderr, "cannot write %s\n", o.out.c_str());
      return 2;
    }
  }
  int devices = 0;
  const cudaError_t probe = cudaGetDeviceCount(&devices);
  if (probe != cudaSuccess || devices == 0) {
    const std::string why =
        probe != cudaSuccess ? std::string(cudaGetErrorString(probe)) : "0 devices";
    // With an NVIDIA driver loaded, no usable device is a failure (e.g. a driver older than
    // this CUDA runtime needs), not a machine without a GPU.
    std::ifstream driver("/proc/driver/nvidia/version");
    std::string driver_line;
    if (driver && std::getline(driver, driver_line)) {
      Emit("{\"device\": null, \"error\": " +
           Str("an NVIDIA driver is loaded but no CUDA device is usable (" + why +
               "); driver: " + driver_line) +
           "}");
      return 1;
    }
    Emit("{\"device\": null, \"skipped\": " +
         Str("no CUDA device (" + why + "): nothing measured") + "}");
    return 0;
  }
  g_seed = o.seed_given
               ? o.seed
               : (static_cast<uint64_t>(std::random_device{}()) << 32) ^ std::random_device{}();

  Context c;
  cudaDeviceProp prop{};
  CUDA_OK(cudaGetDeviceProperties(&prop, 0));
  CUDA_OK(cudaSetDevice(0));
  int runtime = 0, driver = 0;
  CUDA_OK(cudaRuntimeGetVersion(&runtime));
  CUDA_OK(cudaDriverGetVersion(&driver));
  Emit("{\"device\": " + Str(prop.name) +
       ", \"sm\": " + std::to_string(prop.major * 10 + prop.minor) +
       ", \"multiprocessors\": " + std::to_string(prop.multiProcessorCount) +
       ", \"memory_gib\": " + Num(static_cast<double>(prop.totalGlobalMem) / (1u << 30), 1) +
       ", \"cuda_runtime\": " + std::to_string(runtime) +
       ", \"cuda_driver\": " + std::to_string(driver) + ", \"impl\": \"moemesh\"" +
       ", \"warmup_ms\": " + Num(o.warmup_ms, -1) + ", \"rep_ms\": " + Num(o.rep_ms, -1) +
       ", \"seed\": " + std::to_string(g_seed) + "}");

  CUDA_OK(cudaStreamCreateWithFlags(&c.stream, cudaStreamNonBlocking));
  CUBLAS_OK(cublasCreate(&c.cublas));
  // cublasSetStream resets the workspace to cuBLAS's pool, so the stream first; a workspace
  // of our own keeps cuBLAS from allocating while a graph is captured.
  CUBLAS_OK(cublasSetStream(c.cublas, c.stream));
  DeviceBuffer<unsigned char> cublas_ws(kCublasWorkspaceBytes);
  CUBLAS_OK(cublasSetWorkspace(c.cublas, cublas_ws.get(), cublas_ws.bytes()));

  bool ok = true;
  try {
    Ceilings(c, o.warmup_ms, o.rep_ms);
  } catch (const std::exception& e) {
    Emit("{\"ceiling\": \"error\", \"error\": " + Str(e.what()) + "}");
    ok = false;
  }
  const std::vector<Shape> all = AllShapes();
  for (const std::string& name : o.shapes) {
    const Shape& s =
        *std::find_if(all.begin(), all.end(), [&](const Shape& x) { return x.name == name; });
    try {
      ok &= RunShape(c, s, o);  // the shape's buffers are freed when it returns or throws
    } catch (const std::exception& e) {
      Emit("{\"shape\": " + Str(s.name) + ", \"error\": " + Str(e.what()) + "}");
      ok = false;
      const cudaError_t sticky = cudaDeviceSynchronize();
      if (sticky != cudaSuccess) {  // the context is gone: nothing more can run
        Emit("{\"error\": " + Str(std::string("CUDA context lost: ") + cudaGetErrorString(sticky)) +
             "}");
        break;
      }
    }
  }
  try {  // errors of work still in flight surface here at the latest
    CUDA_OK(cudaDeviceSynchronize());
    CUDA_OK(cudaGetLastError());
    CUBLAS_OK(cublasDestroy(c.cublas));
    cublas_ws.Reset();
    CUDA_OK(cudaStreamDestroy(c.stream));
  } catch (const std::exception& e) {
    Emit("{\"error\": " + Str(e.what()) + "}");
    ok = false;
  }
  if (!ok) std::fprintf(stderr, "moe_gpu_bench: FAILED (see the error / check lines above)\n");
  return ok ? 0 : 1;
}

}  // namespace
}  // namespace moemesh

int main(int argc, char** argv) {
  try {
    return moemesh::Main(argc, argv);
  } catch (const std::exception& e) {
    moemesh::Emit("{\"error\": " + moemesh::Str(e.what()) + "}");
    return 1;
  }
}
