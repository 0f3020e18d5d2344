// One expert's feed-forward network over a block of rows, on the CPU.
//
//   gated:     y = down( act(gate(x) [+ b_g], up(x) [+ b_u]) ) [+ b_down]
//   non-gated: y = down( relu(up(x)) ) [+ b_down]      (Switch Transformers)
//
// float32, OpenBLAS. The work splits into independent tasks so a layer can spread its
// experts over a ThreadPool:
//   * ExpertGateUpAct(block range): one GEMM over the gate+up weight rows of the range,
//     then the activation over those columns while they are still in cache, writing h;
//   * ExpertDown(column range): y[:, cols] = h · down[cols]ᵀ (+ bias).
// A single row uses GEMV, which streams the weights at memory speed where a one-row
// GEMM does not.
//
// OpenBLAS's rounding depends on the column range a call covers, so the split is
// canonical: kGateUpBlocksPerTask blocks and kDownColsPerTask columns per task, the
// same in ExpertFfn, in MoeLayer's thread pool and in every expert service. Whatever
// runs the tasks, in whatever order, the bits are those of ExpertFfn.
//
// Gate/up weight layout ("packed"): the intermediate dimension is cut into blocks of
// kGateUpBlock; block b stores its gate rows then its up rows (non-gated: up rows only).
// PackGateUp builds it from the HF-style stacked [gate; up] matrix.
#pragma once

#include <cstdint>

namespace moemesh {

enum class Activation : uint8_t {
  kSwiGlu,         // silu(g) · u
  kClampedSwiGlu,  // GPT-OSS: g = min(g, L); u = clamp(u, -L, L); (u + 1) · g · sigmoid(α g)
  kRelu,           // relu(u), no gate
};

inline constexpr int64_t kGateUpBlock = 64;
inline constexpr int64_t kGateUpBlocksPerTask = 8;  // 512 intermediate columns
inline constexpr int64_t kDownColsPerTask = 512;

struct ExpertFfnWeights {
  int64_t hidden = 0;        // H
  int64_t intermediate = 0;  // I
  Activation activation = Activation::kSwiGlu;
  float clamp_limit = 7.0f;             // kClampedSwiGlu only
  float alpha = 1.702f;                 // kClampedSwiGlu only
  const float* gate_up = nullptr;       // packed [2I, H] (gated) or [I, H], row-major
  const float* gate_up_bias = nullptr;  // packed [2I] / [I] or nullptr
  const float* down = nullptr;          // [H, I]
  const float* down_bias = nullptr;     // [H] or nullptr

  bool gated() const { return activation != Activation::kRelu; }
  int64_t gate_up_rows() const { return gated() ? 2 * intermediate : intermediate; }
  int64_t num_blocks() const { return (intermediate + kGateUpBlock - 1) / kGateUpBlock; }
};

// Rewrites stacked [gate rows (I); up rows (I)] × `cols` (cols = H for weights, 1 for
// biases) into the packed layout. gated=false: `stacked` holds only the I up rows.
void PackGateUp(const float* stacked, int64_t intermediate, int64_t cols, bool gated,
                float* packed);
// The packed row that holds stacked (gated) row `r` of [gate rows (I); up rows (I)]: the
// inverse of PackGateUp's row order, for a consumer of the stacked layout (the GPU).
int64_t PackedGateUpRow(int64_t r, int64_t intermediate);

// Floats of the per-row gate/up buffer (ld = gate_up_rows) and of h (ld = I).
inline int64_t GateUpScratch(const ExpertFfnWeights& w, int64_t rows) {
  return rows * w.gate_up_rows();
}
inline int64_t HiddenScratch(const ExpertFfnWeights& w, int64_t rows) {
  return rows * w.intermediate;
}

// Canonical task counts for `w` (see above).
inline int64_t NumGateUpTasks(const ExpertFfnWeights& w) {
  return (w.num_blocks() + kGateUpBlocksPerTask - 1) / kGateUpBlocksPerTask;
}
inline int64_t NumDownTasks(const ExpertFfnWeights& w) {
  return (w.hidden + kDownColsPerTask - 1) / kDownColsPerTask;
}
// Canonical task i of each kind (gu, h, y as below).
void ExpertGateUpTask(const ExpertFfnWeights& w, const float* x, int64_t rows, int64_t task,
                      float* gu, float* h);
void ExpertDownTask(const ExpertFfnWeights& w, const float* h, int64_t rows, int64_t task,
                    float* y);

// Blocks [block_begin, block_end): gu (rows × gate_up_rows, ld gate_up_rows) receives the
// GEMM output of those blocks' columns; h (rows × I, ld I) receives act() of them.
void ExpertGateUpAct(const ExpertFfnWeights& w, const float* x, int64_t rows, int64_t block_begin,
                     int64_t block_end, float* gu, float* h);

// Output columns [col_begin, col_end) of y (rows × H, ld H) from h.
void ExpertDown(const ExpertFfnWeights& w, const float* h, int64_t rows, int64_t col_begin,
                int64_t col_end, float* y);

// The whole FFN on one thread. scratch holds GateUpScratch + HiddenScratch floats.
inline int64_t ExpertFfnScratch(const ExpertFfnWeights& w, int64_t rows) {
  return GateUpScratch(w, rows) + HiddenScratch(w, rows);
}
void ExpertFfn(const ExpertFfnWeights& w, const float* x, int64_t rows, float* scratch, float* y);

// Sets OpenBLAS's own thread count: callers that run the tasks above on a thread pool of
// their own call BLAS single-threaded inside them.
void SetBlasThreads(int n);

}  // namespace moemesh
