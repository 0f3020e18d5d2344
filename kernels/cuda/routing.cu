#include <math_constants.h>

#include <algorithm>
#include <cstdint>

#include "kernels/cpu/routing_math.h"
#include "kernels/cuda/cublas.h"
#include "kernels/cuda/launch.cuh"
#include "kernels/cuda/routing.cuh"

namespace moemesh::cuda {
namespace {

constexpr int kMaxExperts = 8192;  // 65 KiB of shared memory per block: see RouteTopK

// The better of two (value, expert) candidates: the larger value, ties (and -inf) to the
// lower id, as the CPU reference's top-k. An unset candidate (id < 0) never wins.
__device__ __forceinline__ bool Better(float v, int i, float bv, int bi) {
  return i >= 0 && (bi < 0 || v > bv || (v == bv && i < bi));
}

struct MaxOp {
  __device__ float operator()(float a, float b) const { return fmaxf(a, b); }
  static __device__ float Identity() { return -CUDART_INF_F; }
};
struct SumOp {
  __device__ float operator()(float a, float b) const { return a + b; }
  static __device__ float Identity() { return 0.0f; }
};

template <typename Op>
__device__ __forceinline__ float WarpReduce(float v, Op op) {
  for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

__device__ __forceinline__ void WarpArgMax(float& v, int& i) {
  for (int o = 16; o > 0; o >>= 1) {
    const float ov = __shfl_xor_sync(0xffffffffu, v, o);
    const int oi = __shfl_xor_sync(0xffffffffu, i, o);
    if (Better(ov, oi, v, i)) {
      v = ov;
      i = oi;
    }
  }
}

// Block-wide reductions; every thread gets the result. blockDim.x is a multiple of 32.
// `red` holds 32 slots and is reused: the leading barrier protects its last use.
template <typename Op>
__device__ float BlockReduce(float v, float* red, Op op) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  v = WarpReduce(v, op);
  __syncthreads();
  if (lane == 0) red[warp] = v;
  __syncthreads();
  return WarpReduce(lane < warps ? red[lane] : Op::Identity(), op);
}

__device__ void BlockArgMax(float& v, int& i, float* redv, int* redi) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  WarpArgMax(v, i);
  __syncthreads();
  if (lane == 0) {
    redv[warp] = v;
    redi[warp] = i;
  }
  __syncthreads();
  v = lane < warps ? redv[lane] : 0.0f;
  i = lane < warps ? redi[lane] : -1;
  WarpArgMax(v, i);
}

// One block per token. Shared memory: scores[E], choice[E], group scores[G], group
// chosen flags[G], chosen ids and values[k], 32 + 32 reduction slots.
__global__ void RouteKernel(RoutingParams p, const float* __restrict__ logits,
                            const float* __restrict__ correction_bias,
                            int32_t* __restrict__ topk_ids, float* __restrict__ topk_weights,
                            float* __restrict__ scores_out) {
  extern __shared__ float smem[];
  const int E = p.num_experts, k = p.top_k, G = p.num_groups;
  float* scores = smem;
  float* choice = scores + E;
  float* gscore = choice + E;
  float* chosen_v = gscore + G;
  float* redv = chosen_v + k;
  int* redi = reinterpret_cast<int*>(redv + 32);
  int* gsel = redi + 32;
  int* chosen = gsel + G;

  const int64_t t = blockIdx.x;
  const float* lg = logits + t * E;
  float* sout = scores_out != nullptr ? scores_out + t * E : nullptr;
  const int tid = threadIdx.x, step = blockDim.x;

  // Scores: softmax / sigmoid / the logits themselves; the probabilities out.
  const bool softmax_all = p.scoring == Scoring::kSoftmax;
  if (softmax_all || (p.scoring == Scoring::kSoftmaxOverTopK && sout != nullptr)) {
    float* dst = softmax_all ? scores : sout;
    float mx = -CUDART_INF_F;
    for (int e = tid; e < E; e += step) mx = fmaxf(mx, lg[e]);
    mx = BlockReduce(mx, redv, MaxOp());
    float sum = 0.0f;
    for (int e = tid; e < E; e += step) {
      const float x = expf(lg[e] - mx);
      dst[e] = x;
      sum += x;
    }
    const float inv = 1.0f / BlockReduce(sum, redv, SumOp());
    for (int e = tid; e < E; e += step) dst[e] *= inv;
  }
  if (p.scoring == Scoring::kSigmoid) {
    for (int e = tid; e < E; e += step) scores[e] = 1.0f / (1.0f + expf(-lg[e]));
  } else if (p.scoring == Scoring::kSoftmaxOverTopK) {
    for (int e = tid; e < E; e += step) scores[e] = lg[e];
  }
  // Each thread touches the same e's as above: no barrier needed before these.
  for (int e = tid; e < E; e += step) {
    if (sout != nullptr && p.scoring != Scoring::kSoftmaxOverTopK) sout[e] = scores[e];
    choice[e] =
        ChoiceValue(correction_bias != nullptr ? scores[e] + correction_bias[e] : scores[e]);
  }
  __syncthreads();

  // Group-limited selection: only the topk_groups best groups stay eligible.
  if (G > 1) {
    const int gs = E / G;
    for (int g = tid; g < G; g += step) {
      float best = -CUDART_INF_F, second = -CUDART_INF_F;
      for (int i = 0; i < gs; ++i) {
        const float c = choice[g * gs + i];
        if (c > best) {
          second = best;
          best = c;
        } else if (c > second) {
          second = c;
        }
      }
      gscore[g] = ChoiceValue(p.group_score == GroupScore::kMax ? best : best + second);
      gsel[g] = 0;
    }
    __syncthreads();
    if (tid == 0) {
      for (int r = 0; r < p.topk_groups; ++r) {
        float bv = 0.0f;
        int bi = -1;
        for (int g = 0; g < G; ++g) {
          if (!gsel[g] && Better(gscore[g], g, bv, bi)) {
            bv = gscore[g];
            bi = g;
          }
        }
        gsel[bi] = 1;
      }
    }
    __syncthreads();
    for (int e = tid; e < E; e += step) {
      if (!gsel[e / gs]) choice[e] = -CUDART_INF_F;
    }
    __syncthreads();
  }

  // Top-k: k rounds of a block-wide arg-max over the experts not chosen yet.
  for (int r = 0; r < k; ++r) {
    float bv = 0.0f;
    int bi = -1;
    for (int e = tid; e < E; e += step) {
      bool taken = false;
      for (int j = 0; j < r; ++j) taken |= chosen[j] == e;
      if (!taken && Better(choice[e], e, bv, bi)) {
        bv = choice[e];
        bi = e;
      }
    }
    BlockArgMax(bv, bi, redv, redi);
    if (tid == 0) {
      chosen[r] = bi;
      chosen_v[r] = bv;
    }
    __syncthreads();
  }

  // Weights, in the CPU reference's order of operations.
  if (tid == 0) {
    int32_t* ids = topk_ids + t * k;
    float* w = topk_weights + t * k;
    for (int j = 0; j < k; ++j) ids[j] = chosen[j];
    if (p.scoring == Scoring::kSoftmaxOverTopK) {
      float mx = -CUDART_INF_F;
      for (int j = 0; j < k; ++j) mx = fmaxf(mx, chosen_v[j]);
      float sum = 0.0f;
      for (int j = 0; j < k; ++j) {
        w[j] = expf(chosen_v[j] - mx);
        sum += w[j];
      }
      const float inv = 1.0f / sum;
      for (int j = 0; j < k; ++j) w[j] *= inv;
    } else {
      for (int j = 0; j < k; ++j) w[j] = scores[chosen[j]];
    }
    NormalizeAndScale(p, w, k);
  }
}

// RouteKernel's dynamic shared memory (see its layout) and the amount any launch may take
// without opting in.
size_t RouteSharedBytes(const RoutingParams& p) {
  return sizeof(float) * (2 * p.num_experts + p.num_groups + p.top_k + 32) +
         sizeof(int) * (32 + p.num_groups + p.top_k);
}
constexpr size_t kDefaultSharedBytes = 48 << 10;

__global__ void AddBias(float* __restrict__ out, const float* __restrict__ bias, int64_t rows,
                        int cols) {
  const int64_t n = rows * cols;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x) {
    out[i] += bias[i % cols];
  }
}

}  // namespace

cublasStatus_t RouterLogits(cublasHandle_t handle, RouterDType dtype, const void* x, const void* w,
                            const float* bias, int64_t num_tokens, int64_t hidden, int num_experts,
                            float* logits) {
  if (num_tokens <= 0) return CUBLAS_STATUS_SUCCESS;
  if (num_tokens > INT32_MAX || hidden > INT32_MAX || num_experts <= 0)
    return CUBLAS_STATUS_INVALID_VALUE;
  const cudaDataType_t type = dtype == RouterDType::kBF16 ? CUDA_R_16BF : CUDA_R_32F;
  const float alpha = 1.0f, beta = 0.0f;
  // Row-major logits [T, E] = x [T, H] · W [E, H]ᵀ is column-major logitsᵀ [E, T] =
  // Wᵀᵀ · xᵀ: W (column-major [H, E]) transposed, x (column-major [H, T]) as it is.
  const int T = static_cast<int>(num_tokens), H = static_cast<int>(hidden);
  const Cublas* cublas = LoadCublas();
  if (cublas == nullptr) return CUBLAS_STATUS_NOT_INITIALIZED;
  cublasStatus_t s = cublas->gemm_ex(handle, CUBLAS_OP_T, CUBLAS_OP_N, num_experts, T, H, &alpha, w,
                                     type, H, x, type, H, &beta, logits, CUDA_R_32F, num_experts,
                                     CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
  if (s != CUBLAS_STATUS_SUCCESS || bias == nullptr) return s;
  cudaStream_t stream = nullptr;
  if ((s = cublas->get_stream(handle, &stream)) != CUBLAS_STATUS_SUCCESS) return s;
  const int64_t n = num_tokens * num_experts;
  const int blocks = static_cast<int>(std::min<int64_t>((n + 255) / 256, 65535));
  ForgetEarlierErrors();
  AddBias<<<blocks, 256, 0, stream>>>(logits, bias, num_tokens, num_experts);
  return cudaGetLastError() == cudaSuccess ? CUBLAS_STATUS_SUCCESS : CUBLAS_STATUS_EXECUTION_FAILED;
}

cudaError_t RouteTopK(const RoutingParams& params, const float* logits, int64_t num_tokens,
                      const float* correction_bias, int32_t* topk_ids, float* topk_weights,
                      float* scores, cudaStream_t stream) {
  if (!params.Validate().empty() || params.num_experts > kMaxExperts || num_tokens > INT32_MAX) {
    return cudaErrorInvalidValue;
  }
  if (num_tokens <= 0) return cudaSuccess;
  const int E = params.num_experts;
  const int threads = std::min(256, (E + 31) / 32 * 32);
  const size_t shared = RouteSharedBytes(params);
  if (shared > kDefaultSharedBytes) {
    // Past the 48 KiB every launch may take (from about E = 6,100): opt in to more, up to
    // what the device has (227 KiB on Hopper); a launch over it fails here, not wrongly.
    int device = 0, limit = 0;
    cudaError_t e = cudaGetDevice(&device);
    if (e == cudaSuccess) {
      e = cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
    }
    if (e == cudaSuccess && shared > static_cast<size_t>(limit)) e = cudaErrorInvalidValue;
    if (e == cudaSuccess) {
      e = cudaFuncSetAttribute(RouteKernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                               static_cast<int>(shared));
    }
    if (e != cudaSuccess) {
      cudaGetLastError();
      return e;
    }
  }
  ForgetEarlierErrors();
  RouteKernel<<<static_cast<unsigned>(num_tokens), threads, shared, stream>>>(
      params, logits, correction_bias, topk_ids, topk_weights, scores);
  return cudaGetLastError();
}

}  // namespace moemesh::cuda
