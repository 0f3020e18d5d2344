#include "kernels/cpu/expert_ffn.h"

#include <cblas.h>

#include <algorithm>
#include <cmath>
#include <cstring>

namespace moemesh {
namespace {

// exp(x) for float32, vectorisable: Cody-Waite range reduction and a degree-6
// polynomial (Cephes expf coefficients), relative error below 2 ulp over the range
// the activations use. std::exp does not vectorise without -ffast-math, and at
// T·k·I activations per layer it would cost as much as a GEMM.
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

// target_clones gives an AVX-512 and an AVX2 body picked at load time, so one binary
// runs anywhere and still vectorises 16 or 8 lanes wide.
[[gnu::target_clones("avx512f", "avx2,fma", "default")]]
void SwiGluRow(float* __restrict row, const float* __restrict bias, int64_t inter) {
  float* __restrict gate = row;
  const float* __restrict up = row + inter;
  if (bias == nullptr) {
    for (int64_t i = 0; i < inter; ++i) gate[i] = gate[i] * Sigmoid(gate[i]) * up[i];
  } else {
    const float* bg = bias;
    const float* bu = bias + inter;
    for (int64_t i = 0; i < inter; ++i) {
      const float g = gate[i] + bg[i];
      gate[i] = g * Sigmoid(g) * (up[i] + bu[i]);
    }
  }
}

[[gnu::target_clones("avx512f", "avx2,fma", "default")]]
void ClampedSwiGluRow(float* __restrict row, const float* __restrict bias, int64_t inter,
                      float limit, float alpha) {
  float* __restrict gate = row;
  const float* __restrict up = row + inter;
  for (int64_t i = 0; i < inter; ++i) {
    float g = gate[i] + (bias ? bias[i] : 0.0f);
    float u = up[i] + (bias ? bias[inter + i] : 0.0f);
    g = std::min(g, limit);
    u = std::min(limit, std::max(-limit, u));
    gate[i] = (u + 1.0f) * (g * Sigmoid(alpha * g));
  }
}

[[gnu::target_clones("avx512f", "avx2,fma", "default")]]
void ReluRow(float* __restrict row, const float* __restrict bias, int64_t inter) {
  for (int64_t i = 0; i < inter; ++i) {
    const float u = row[i] + (bias ? bias[i] : 0.0f);
    row[i] = u > 0.0f ? u : 0.0f;
  }
}

}  // namespace

void ApplyActivation(const ExpertFfnWeights& w, float* gu, int64_t rows, int64_t ld) {
  for (int64_t r = 0; r < rows; ++r) {
    float* row = gu + r * ld;
    switch (w.activation) {
      case Activation::kSwiGlu:
        SwiGluRow(row, w.gate_up_bias, w.intermediate);
        break;
      case Activation::kClampedSwiGlu:
        ClampedSwiGluRow(row, w.gate_up_bias, w.intermediate, w.clamp_limit, w.alpha);
        break;
      case Activation::kRelu:
        ReluRow(row, w.gate_up_bias, w.intermediate);
        break;
    }
  }
}

void ExpertFfn(const ExpertFfnWeights& w, const float* x, int64_t rows, float* scratch,
               float* y) {
  if (rows == 0) return;
  const int64_t H = w.hidden, I = w.intermediate, cols = w.first_gemm_cols();
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, rows, cols, H, 1.0f, x, H, w.gate_up, H,
              0.0f, scratch, cols);
  ApplyActivation(w, scratch, rows, cols);
  float beta = 0.0f;
  if (w.down_bias != nullptr) {
    for (int64_t r = 0; r < rows; ++r) std::memcpy(y + r * H, w.down_bias, H * sizeof(float));
    beta = 1.0f;
  }
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, rows, H, I, 1.0f, scratch, cols, w.down, I,
              beta, y, H);
}

}  // namespace moemesh
