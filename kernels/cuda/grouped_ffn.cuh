// The experts' feed-forward network over rows grouped by expert (kernels/cuda/permute),
// BF16 weights and activations, FP32 accumulation, every expert of the GPU in one launch
// per stage. Host launchers only.
//
//   GroupedGateUpAct: h[r, :] = act(x[r, :] · gateᵀ [+ b_g], x[r, :] · upᵀ [+ b_u]) for the
//     expert that owns row r; gate and up are computed side by side by the same tile and
//     the activation applied before anything is stored, so the [rows, 2I] intermediate
//     never goes through memory: only h [rows, I] (BF16) does.
//   GroupedDown: y[r, :] = h[r, :] · downᵀ [+ b_down], FP32 out.
//
// Tensor cores through WMMA (16×16×16 BF16 fragments), 64×64 output tiles per block of
// four warps; a tile never spans two experts (each expert's rows are cut into tiles of
// their own, found from expert_offsets on the device: no host round trip). A first,
// correct version: no cp.async pipeline or TMA yet.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "kernels/cpu/expert_ffn.h"

namespace moemesh::cuda {

// All experts of one GPU, device memory, row-major, HF's stacked layout.
struct GroupedFfnWeights {
  int num_experts = 0;
  int64_t hidden = 0;                           // H, a multiple of 16
  int64_t intermediate = 0;                     // I, a multiple of 16
  Activation activation = Activation::kSwiGlu;  // gated ones only (kSwiGlu, kClampedSwiGlu)
  float clamp_limit = 7.0f;
  float alpha = 1.702f;
  const uint16_t* gate_up = nullptr;    // BF16 [E, 2I, H]: expert e's gate rows, then its up rows
  const float* gate_up_bias = nullptr;  // [E, 2I] or nullptr
  const uint16_t* down = nullptr;       // BF16 [E, H, I]
  const float* down_bias = nullptr;     // [E, H] or nullptr
};

// x [rows, H] BF16, grouped: expert e's rows are [expert_offsets[e], expert_offsets[e+1])
// (device int64 [E+1], as BuildPermutation makes them). h [rows, I] BF16 out.
// cudaErrorInvalidValue for shapes the kernels do not take (H or I not a multiple of 16,
// a non-gated activation).
cudaError_t GroupedGateUpAct(const GroupedFfnWeights& w, const uint16_t* x,
                             const int64_t* expert_offsets, int64_t rows, uint16_t* h,
                             cudaStream_t stream);

// y [rows, H] float32 out.
cudaError_t GroupedDown(const GroupedFfnWeights& w, const uint16_t* h,
                        const int64_t* expert_offsets, int64_t rows, float* y, cudaStream_t stream);

}  // namespace moemesh::cuda
