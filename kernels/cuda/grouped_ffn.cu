#include <cuda_bf16.h>
#include <mma.h>

#include <algorithm>

#include "kernels/cuda/grouped_ffn.cuh"
#include "kernels/cuda/launch.cuh"

namespace moemesh::cuda {
namespace {

using namespace nvcuda;

constexpr int kBM = 64, kBN = 64, kBK = 32;
constexpr int kLdAB = kBK + 8;  // BF16 elements per staged row (padding against bank conflicts)
constexpr int kLdC = kBN + 4;   // floats per epilogue row
constexpr int kThreads = 128;   // four warps, 16 rows each
constexpr size_t kOperandBytes = sizeof(__nv_bfloat16) * kLdAB * (kBM + 2 * kBN);
constexpr size_t kEpilogueBytes = sizeof(float) * kLdC * kBM * 2;
constexpr size_t kSmemBytes = kOperandBytes > kEpilogueBytes ? kOperandBytes : kEpilogueBytes;

struct Tile {
  int expert;
  int64_t row0, row_end;
};

// Which expert's rows global m-tile `tile` covers: each expert's rows are cut into
// tiles of their own, in expert order. expert < 0: past the last tile.
__device__ Tile FindTile(const int64_t* offsets, int num_experts, int64_t tile) {
  for (int e = 0; e < num_experts; ++e) {
    const int64_t begin = offsets[e], end = offsets[e + 1];
    const int64_t tiles = (end - begin + kBM - 1) / kBM;
    if (tile < tiles) return {e, begin + tile * kBM, end};
    tile -= tiles;
  }
  return {-1, 0, 0};
}

// Stages rows [row0, row0 + 64) ∩ [.., row_end) × k [k0, k0 + 32) of `src` (row-major,
// ld = K) into dst [64][kLdAB], zeros outside; 8-element (16-byte) vectors, K % 16 == 0.
__device__ void Stage(const __nv_bfloat16* src, int64_t row0, int64_t row_end, int64_t K,
                      int64_t k0, __nv_bfloat16* dst) {
  constexpr int kVectors = kBM * kBK / 8;
  for (int v = threadIdx.x; v < kVectors; v += kThreads) {
    const int r = v / (kBK / 8), c = (v % (kBK / 8)) * 8;
    const int64_t row = row0 + r, k = k0 + c;
    int4 value = make_int4(0, 0, 0, 0);
    if (row < row_end && k + 8 <= K) value = *reinterpret_cast<const int4*>(src + row * K + k);
    *reinterpret_cast<int4*>(dst + r * kLdAB + c) = value;
  }
}

__device__ __forceinline__ float Activate(const GroupedFfnWeights& w, float g, float u) {
  if (w.activation == Activation::kClampedSwiGlu) {
    g = fminf(g, w.clamp_limit);
    u = fminf(fmaxf(u, -w.clamp_limit), w.clamp_limit);
    return (u + 1.0f) * (g / (1.0f + expf(-w.alpha * g)));
  }
  return g / (1.0f + expf(-g)) * u;  // SwiGLU
}

// kGateUp: out = h (BF16) = act(A·gateᵀ, A·upᵀ); else out = y (float) = A·downᵀ.
template <bool kGateUp>
__global__ void __launch_bounds__(kThreads)
    GroupedGemm(GroupedFfnWeights w, const __nv_bfloat16* __restrict__ a,
                const int64_t* __restrict__ offsets, void* __restrict__ out) {
  __shared__ __align__(128) unsigned char smem[kSmemBytes];
  __shared__ Tile tile;
  if (threadIdx.x == 0) tile = FindTile(offsets, w.num_experts, blockIdx.x);
  __syncthreads();
  if (tile.expert < 0) return;

  const int64_t H = w.hidden, I = w.intermediate;
  const int64_t N = kGateUp ? I : H, K = kGateUp ? H : I;
  const int64_t n0 = int64_t{blockIdx.y} * kBN;
  const auto* weights = reinterpret_cast<const __nv_bfloat16*>(kGateUp ? w.gate_up : w.down);
  const __nv_bfloat16* b0 =
      weights + tile.expert * (kGateUp ? 2 * I * H : H * I);  // gate / down rows
  const __nv_bfloat16* b1 = kGateUp ? b0 + I * H : nullptr;   // up rows

  auto* As = reinterpret_cast<__nv_bfloat16*>(smem);
  __nv_bfloat16* Bs0 = As + kBM * kLdAB;
  __nv_bfloat16* Bs1 = Bs0 + kBN * kLdAB;
  const int warp = threadIdx.x / 32;

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc0[4], acc1[4];
  for (int j = 0; j < 4; ++j) {
    wmma::fill_fragment(acc0[j], 0.0f);
    wmma::fill_fragment(acc1[j], 0.0f);
  }
  for (int64_t k0 = 0; k0 < K; k0 += kBK) {
    Stage(a, tile.row0, tile.row_end, K, k0, As);
    Stage(b0, n0, N, K, k0, Bs0);
    if (kGateUp) Stage(b1, n0, N, K, k0, Bs1);
    __syncthreads();
    for (int kk = 0; kk < kBK; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major> fa;
      wmma::load_matrix_sync(fa, As + warp * 16 * kLdAB + kk, kLdAB);
      for (int j = 0; j < 4; ++j) {
        // B(k, n) = W[n][k]: the staged weight rows read column-major.
        wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::col_major> fb;
        wmma::load_matrix_sync(fb, Bs0 + j * 16 * kLdAB + kk, kLdAB);
        wmma::mma_sync(acc0[j], fa, fb, acc0[j]);
        if (kGateUp) {
          wmma::load_matrix_sync(fb, Bs1 + j * 16 * kLdAB + kk, kLdAB);
          wmma::mma_sync(acc1[j], fa, fb, acc1[j]);
        }
      }
    }
    __syncthreads();
  }

  // Epilogue through shared memory (the operand buffers are free now): bias, activation,
  // and the store of the rows and columns that exist.
  float* C0 = reinterpret_cast<float*>(smem);
  float* C1 = C0 + kBM * kLdC;
  for (int j = 0; j < 4; ++j) {
    wmma::store_matrix_sync(C0 + warp * 16 * kLdC + j * 16, acc0[j], kLdC, wmma::mem_row_major);
    if (kGateUp)
      wmma::store_matrix_sync(C1 + warp * 16 * kLdC + j * 16, acc1[j], kLdC, wmma::mem_row_major);
  }
  __syncthreads();
  for (int i = threadIdx.x; i < kBM * kBN; i += kThreads) {
    const int r = i / kBN, c = i % kBN;
    const int64_t row = tile.row0 + r, col = n0 + c;
    if (row >= tile.row_end || col >= N) continue;
    if (kGateUp) {
      float g = C0[r * kLdC + c], u = C1[r * kLdC + c];
      if (w.gate_up_bias != nullptr) {
        g += w.gate_up_bias[tile.expert * 2 * I + col];
        u += w.gate_up_bias[tile.expert * 2 * I + I + col];
      }
      static_cast<__nv_bfloat16*>(out)[row * I + col] = __float2bfloat16_rn(Activate(w, g, u));
    } else {
      float y = C0[r * kLdC + c];
      if (w.down_bias != nullptr) y += w.down_bias[tile.expert * H + col];
      static_cast<float*>(out)[row * H + col] = y;
    }
  }
}

bool Supported(const GroupedFfnWeights& w) {
  return w.num_experts > 0 && w.hidden > 0 && w.intermediate > 0 && w.hidden % 16 == 0 &&
         w.intermediate % 16 == 0 && w.activation != Activation::kRelu;
}

template <bool kGateUp>
cudaError_t Launch(const GroupedFfnWeights& w, const uint16_t* a, const int64_t* offsets,
                   int64_t rows, void* out, cudaStream_t stream) {
  if (!Supported(w) || rows < 0) return cudaErrorInvalidValue;
  if (rows == 0) return cudaSuccess;
  // An upper bound on the tiles: each expert adds at most one partial tile.
  const int64_t m_tiles = (rows + kBM - 1) / kBM + w.num_experts;
  const int64_t n = kGateUp ? w.intermediate : w.hidden;
  if (m_tiles > INT32_MAX) return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned>(m_tiles), static_cast<unsigned>((n + kBN - 1) / kBN));
  ForgetEarlierErrors();
  GroupedGemm<kGateUp>
      <<<grid, kThreads, 0, stream>>>(w, reinterpret_cast<const __nv_bfloat16*>(a), offsets, out);
  return cudaGetLastError();
}

}  // namespace

cudaError_t GroupedGateUpAct(const GroupedFfnWeights& w, const uint16_t* x,
                             const int64_t* expert_offsets, int64_t rows, uint16_t* h,
                             cudaStream_t stream) {
  return Launch<true>(w, x, expert_offsets, rows, h, stream);
}

cudaError_t GroupedDown(const GroupedFfnWeights& w, const uint16_t* h,
                        const int64_t* expert_offsets, int64_t rows, float* y,
                        cudaStream_t stream) {
  return Launch<false>(w, h, expert_offsets, rows, y, stream);
}

}  // namespace moemesh::cuda
