#include "kernels/cpu/expert_ffn.h"

#include <cblas.h>

#include <algorithm>
#include <cmath>
#include <cstring>

namespace moemesh {
namespace {

// exp(x) for float32, vectorisable: Cody-Waite range reduction and a degree-6
// polynomial (Cephes expf coefficients), within 2 ulp over the activations' range.
// std::exp does not vectorise without -ffast-math, and at T·k·I activations per layer
// it would cost as much as a GEMM.
inline float FastExp(float x) {
  x = std::min(88.3762626647949f, std::max(-87.3365447504f, x));
  const float fx = std::nearbyint(x * 1.44269504088896341f);
  float r = x - fx * 0.693359375f;
  r = r - fx * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  int32_t bits;
  std::memcpy(&bits, &p, sizeof bits);
  bits += static_cast<int32_t>(fx) << 23;
  float out;
  std::memcpy(&out, &bits, sizeof out);
  return out;
}

inline float Sigmoid(float x) { return 1.0f / (1.0f + FastExp(-x)); }

// target_clones gives AVX-512 and AVX2 bodies picked at load time, so one binary runs
// anywhere and still vectorises 16 or 8 lanes wide. Not under ThreadSanitizer: the
// instrumented IFUNC resolver runs before its runtime exists, and crashes the process.
#if defined(__SANITIZE_THREAD__)
#define MOEMESH_CLONES
#else
#define MOEMESH_CLONES [[gnu::target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")]]
#endif
MOEMESH_CLONES void SwiGlu(const float* __restrict gate, const float* __restrict up,
                           const float* __restrict bg, const float* __restrict bu, int64_t n,
                           float* __restrict h) {
  if (bg == nullptr) {
    for (int64_t i = 0; i < n; ++i) h[i] = gate[i] * Sigmoid(gate[i]) * up[i];
  } else {
    for (int64_t i = 0; i < n; ++i) {
      const float g = gate[i] + bg[i];
      h[i] = g * Sigmoid(g) * (up[i] + bu[i]);
    }
  }
}

MOEMESH_CLONES void ClampedSwiGlu(const float* __restrict gate, const float* __restrict up,
                                  const float* __restrict bg, const float* __restrict bu, int64_t n,
                                  float limit, float alpha, float* __restrict h) {
  for (int64_t i = 0; i < n; ++i) {
    float g = gate[i] + (bg ? bg[i] : 0.0f);
    float u = up[i] + (bu ? bu[i] : 0.0f);
    g = std::min(g, limit);
    u = std::min(limit, std::max(-limit, u));
    h[i] = (u + 1.0f) * (g * Sigmoid(alpha * g));
  }
}

MOEMESH_CLONES void Relu(const float* __restrict up, const float* __restrict bu, int64_t n,
                         float* __restrict h) {
  for (int64_t i = 0; i < n; ++i) {
    const float u = up[i] + (bu ? bu[i] : 0.0f);
    h[i] = u > 0.0f ? u : 0.0f;
  }
}

// y[rows, n] = x[rows, k] · W[n, k]ᵀ with leading dimensions; GEMV for one row.
void MatMulT(const float* x, int64_t ldx, const float* w, int64_t ldw, int64_t rows, int64_t n,
             int64_t k, float beta, float* y, int64_t ldy) {
  if (rows == 1) {
    cblas_sgemv(CblasRowMajor, CblasNoTrans, n, k, 1.0f, w, ldw, x, 1, beta, y, 1);
  } else {
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, rows, n, k, 1.0f, x, ldx, w, ldw, beta, y,
                ldy);
  }
}

}  // namespace

void PackGateUp(const float* stacked, int64_t inter, int64_t cols, bool gated, float* packed) {
  for (int64_t b0 = 0; b0 < inter; b0 += kGateUpBlock) {
    const int64_t len = std::min(kGateUpBlock, inter - b0);
    if (gated) {
      std::memcpy(packed + 2 * b0 * cols, stacked + b0 * cols, len * cols * sizeof(float));
      std::memcpy(packed + (2 * b0 + len) * cols, stacked + (inter + b0) * cols,
                  len * cols * sizeof(float));
    } else {
      std::memcpy(packed + b0 * cols, stacked + b0 * cols, len * cols * sizeof(float));
    }
  }
}

int64_t PackedGateUpRow(int64_t r, int64_t inter) {
  const bool up = r >= inter;
  const int64_t j = up ? r - inter : r;
  const int64_t b0 = j / kGateUpBlock * kGateUpBlock;
  const int64_t len = std::min(kGateUpBlock, inter - b0);
  return 2 * b0 + (up ? len : 0) + (j - b0);
}

void ExpertGateUpAct(const ExpertFfnWeights& w, const float* x, int64_t rows, int64_t block_begin,
                     int64_t block_end, float* gu, float* h) {
  if (rows == 0 || block_begin >= block_end) return;
  const int64_t H = w.hidden, I = w.intermediate, ld = w.gate_up_rows();
  const int64_t per = w.gated() ? 2 : 1;
  const int64_t c0 = per * block_begin * kGateUpBlock;
  const int64_t c1 = per * std::min(block_end * kGateUpBlock, I);
  MatMulT(x, H, w.gate_up + c0 * H, H, rows, c1 - c0, H, 0.0f, gu + c0, ld);
  const float* bias = w.gate_up_bias;
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = gu + r * ld;
    float* hr = h + r * I;
    for (int64_t b = block_begin; b < block_end; ++b) {
      const int64_t i0 = b * kGateUpBlock, len = std::min(kGateUpBlock, I - i0);
      const int64_t g = per * i0;  // first gate (or up) column of the block
      switch (w.activation) {
        case Activation::kSwiGlu:
          SwiGlu(row + g, row + g + len, bias ? bias + g : nullptr, bias ? bias + g + len : nullptr,
                 len, hr + i0);
          break;
        case Activation::kClampedSwiGlu:
          ClampedSwiGlu(row + g, row + g + len, bias ? bias + g : nullptr,
                        bias ? bias + g + len : nullptr, len, w.clamp_limit, w.alpha, hr + i0);
          break;
        case Activation::kRelu:
          Relu(row + g, bias ? bias + g : nullptr, len, hr + i0);
          break;
      }
    }
  }
}

void ExpertDown(const ExpertFfnWeights& w, const float* h, int64_t rows, int64_t col_begin,
                int64_t col_end, float* y) {
  if (rows == 0 || col_begin >= col_end) return;
  const int64_t H = w.hidden, I = w.intermediate, n = col_end - col_begin;
  float beta = 0.0f;
  if (w.down_bias != nullptr) {
    for (int64_t r = 0; r < rows; ++r) {
      std::memcpy(y + r * H + col_begin, w.down_bias + col_begin, n * sizeof(float));
    }
    beta = 1.0f;
  }
  MatMulT(h, I, w.down + col_begin * I, I, rows, n, I, beta, y + col_begin, H);
}

void ExpertGateUpTask(const ExpertFfnWeights& w, const float* x, int64_t rows, int64_t task,
                      float* gu, float* h) {
  const int64_t b0 = task * kGateUpBlocksPerTask;
  ExpertGateUpAct(w, x, rows, b0, std::min(w.num_blocks(), b0 + kGateUpBlocksPerTask), gu, h);
}

void ExpertDownTask(const ExpertFfnWeights& w, const float* h, int64_t rows, int64_t task,
                    float* y) {
  const int64_t c0 = task * kDownColsPerTask;
  ExpertDown(w, h, rows, c0, std::min(w.hidden, c0 + kDownColsPerTask), y);
}

void ExpertFfn(const ExpertFfnWeights& w, const float* x, int64_t rows, float* scratch, float* y) {
  if (rows == 0) return;
  float* h = scratch + GateUpScratch(w, rows);
  for (int64_t t = 0; t < NumGateUpTasks(w); ++t) ExpertGateUpTask(w, x, rows, t, scratch, h);
  for (int64_t t = 0; t < NumDownTasks(w); ++t) ExpertDownTask(w, h, rows, t, y);
}

void SetBlasThreads(int n) { openblas_set_num_threads(n); }

}  // namespace moemesh
