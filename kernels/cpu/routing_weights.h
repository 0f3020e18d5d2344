// The routing weights' last step, written once for the CPU top-k (kernels/cpu/routing.cc)
// and the CUDA one (kernels/cuda/routing.cu), so both take it in the same order of
// operations: the k chosen weights normalised to sum to 1 (+ eps) where the family does,
// then scaled.
#pragma once

#include "kernels/cpu/routing.h"

#ifdef __CUDACC__
#define MOEMESH_HOST_DEVICE __host__ __device__
#else
#define MOEMESH_HOST_DEVICE
#endif

namespace moemesh {

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
