// The routing steps written once for the CPU top-k (kernels/cpu/routing.cc) and the CUDA
// one (kernels/cuda/routing.cu), so both take them in the same order of operations.
#pragma once

#include "kernels/cpu/routing.h"

#ifdef __CUDACC__
#define MOEMESH_HOST_DEVICE __host__ __device__
#else
#define MOEMESH_HOST_DEVICE
#endif

namespace moemesh {

// A score as the expert (or group) choice sees it: NaN counts as -inf, so a token whose
// scores are not numbers gets the lowest expert ids, the same on every device, instead of
// whatever order comparisons with NaN happen to give.
MOEMESH_HOST_DEVICE inline float ChoiceValue(float v) {
  return v != v ? -__builtin_huge_valf() : v;
}

// The k chosen weights normalised to sum to 1 (+ eps) where the family does, then scaled.
MOEMESH_HOST_DEVICE inline void NormalizeAndScale(const RoutingParams& p, float* w, int k) {
  if (p.normalize) {
    float sum = 0.0f;
    for (int j = 0; j < k; ++j) sum += w[j];
    const float denom = sum + p.normalize_eps;
    for (int j = 0; j < k; ++j) w[j] /= denom;
  }
  if (p.scaling != 1.0f) {
    for (int j = 0; j < k; ++j) w[j] *= p.scaling;
  }
}

}  // namespace moemesh
