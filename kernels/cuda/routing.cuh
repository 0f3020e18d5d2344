// Token-choice routing on the GPU: the same contract as moemesh::RouteTopK
// (kernels/cpu/routing.h), every family through RoutingParams. Host launchers only.
//
// RouterLogits: logits[T, E] = x[T, H] · W[E, H]ᵀ (+ bias[E]) through cuBLAS, FP32
// accumulation and output, x and W in FP32 or BF16 (as HF computes router logits in FP32
// from the checkpoint's weights). RouteTopK: one fused kernel per token (a block):
// scoring (softmax / sigmoid / raw logits), correction bias, group-limited selection,
// top-k (descending, ties to the lower expert id, as the CPU reference), weights,
// normalisation and scaling.
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime_api.h>

#include <cstdint>

#include "kernels/cpu/routing.h"

namespace moemesh::cuda {

enum class RouterDType : uint8_t { kF32, kBF16 };

// logits [T, E] float32 = x [T, H] · W [E, H]ᵀ, both row-major of `dtype`; then + bias [E]
// (float32, may be nullptr). Runs on the handle's stream. CUBLAS_STATUS_* on failure
// (NOT_INITIALIZED when cuBLAS cannot be loaded: kernels/cuda/cublas.h, whose create /
// set_stream make the handle without linking cuBLAS).
cublasStatus_t RouterLogits(cublasHandle_t handle, RouterDType dtype, const void* x, const void* w,
                            const float* bias, int64_t num_tokens, int64_t hidden, int num_experts,
                            float* logits);

// Routes T tokens on `stream`; all pointers device memory, shapes as RouteTopK's:
// logits [T, E], correction_bias [E] or nullptr, topk_ids and topk_weights [T, k],
// scores [T, E] or nullptr. params must be valid (RoutingParams::Validate).
cudaError_t RouteTopK(const RoutingParams& params, const float* logits, int64_t num_tokens,
                      const float* correction_bias, int32_t* topk_ids, float* topk_weights,
                      float* scores, cudaStream_t stream);

}  // namespace moemesh::cuda
