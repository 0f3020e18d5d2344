// One expert's feed-forward network over a block of rows, on the CPU.
//
//   gated:     y = down( act(gate(x) [+ b_g], up(x) [+ b_u]) ) [+ b_down]
//   non-gated: y = down( relu(up(x)) ) [+ b_down]      (Switch Transformers)
//
// Two OpenBLAS SGEMMs in float32. Gate and up weights are stacked into one
// [2I, H] matrix (gate rows first) so the first GEMM reads x once; the activation
// (and the gate/up biases) is applied in one pass over that GEMM's output, writing
// the product into the same scratch rows, which the second GEMM reads with a stride.
#pragma once

#include <cstdint>

namespace moemesh {

enum class Activation : uint8_t {
  kSwiGlu,         // silu(g) · u
  kClampedSwiGlu,  // GPT-OSS: g = min(g, L); u = clamp(u, -L, L); (u + 1) · g · sigmoid(α g)
  kRelu,           // relu(u), no gate (w_gate_up holds only the I up rows)
};

struct ExpertFfnWeights {
  int64_t hidden = 0;                // H
  int64_t intermediate = 0;          // I
  Activation activation = Activation::kSwiGlu;
  float clamp_limit = 7.0f;          // kClampedSwiGlu only
  float alpha = 1.702f;              // kClampedSwiGlu only
  const float* gate_up = nullptr;    // [2I, H] (gated) or [I, H] (kRelu), row-major
  const float* gate_up_bias = nullptr;  // [2I] / [I] or nullptr
  const float* down = nullptr;       // [H, I]
  const float* down_bias = nullptr;  // [H] or nullptr

  bool gated() const { return activation != Activation::kRelu; }
  int64_t first_gemm_cols() const { return gated() ? 2 * intermediate : intermediate; }
};

// Scratch floats ExpertFfn needs for `rows` rows.
inline int64_t ExpertFfnScratch(const ExpertFfnWeights& w, int64_t rows) {
  return rows * w.first_gemm_cols();
}

// y[rows, H] = FFN(x[rows, H]). scratch holds ExpertFfnScratch(w, rows) floats.
// BLAS threading is whatever the caller configured.
void ExpertFfn(const ExpertFfnWeights& w, const float* x, int64_t rows, float* scratch,
               float* y);

// The activation pass alone, exposed for tests and benchmarks: for each of `rows`
// rows of `gu` (row stride ld), writes act(row) into the row's first I entries.
void ApplyActivation(const ExpertFfnWeights& w, float* gu, int64_t rows, int64_t ld);

}  // namespace moemesh
