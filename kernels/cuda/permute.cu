#include <cuda_bf16.h>

#include <algorithm>
#include <cub/device/device_radix_sort.cuh>

#include "kernels/cuda/launch.cuh"
#include "kernels/cuda/permute.cuh"

namespace moemesh::cuda {
namespace {

int KeyBits(int num_experts) {
  int bits = 1;
  while ((1 << bits) < num_experts) ++bits;
  return bits;
}

// Workspace layout: sorted keys, slot indices in order, sorted slot indices, then cub's.
struct Layout {
  size_t keys_out, vals_in, vals_out, cub, total;
};

size_t Align(size_t n) { return (n + 255) / 256 * 256; }

Layout MakeLayout(int64_t slots, size_t cub_bytes) {
  Layout l{};
  const size_t ints = Align(sizeof(int32_t) * static_cast<size_t>(std::max<int64_t>(slots, 1)));
  l.keys_out = 0;
  l.vals_in = l.keys_out + ints;
  l.vals_out = l.vals_in + ints;
  l.cub = l.vals_out + ints;
  l.total = l.cub + Align(cub_bytes);
  return l;
}

size_t CubBytes(int64_t slots, int num_experts) {
  size_t bytes = 0;
  cub::DeviceRadixSort::SortPairs(
      nullptr, bytes, static_cast<const int32_t*>(nullptr), static_cast<int32_t*>(nullptr),
      static_cast<const int32_t*>(nullptr), static_cast<int32_t*>(nullptr), static_cast<int>(slots),
      0, KeyBits(num_experts));
  return bytes;
}

__global__ void Iota(int32_t* v, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x) {
    v[i] = static_cast<int32_t>(i);
  }
}

__global__ void Scatter(const int32_t* __restrict__ sorted_slots, int64_t slots, int top_k,
                        int32_t* __restrict__ row_token, int32_t* __restrict__ slot_row) {
  for (int64_t r = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; r < slots;
       r += int64_t{gridDim.x} * blockDim.x) {
    const int32_t s = sorted_slots[r];
    row_token[r] = s / top_k;
    slot_row[s] = static_cast<int32_t>(r);
  }
}

// expert_offsets[e] = the first sorted row whose expert is ≥ e (a binary search per e).
__global__ void Offsets(const int32_t* __restrict__ sorted_keys, int64_t slots, int num_experts,
                        int64_t* __restrict__ offsets) {
  const int e = blockIdx.x * blockDim.x + threadIdx.x;
  if (e > num_experts) return;
  int64_t lo = 0, hi = slots;
  while (lo < hi) {
    const int64_t mid = (lo + hi) / 2;
    if (sorted_keys[mid] < e) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  offsets[e] = lo;
}

__device__ __forceinline__ float Load(const float* p, int64_t i) { return p[i]; }
__device__ __forceinline__ float Load(const __nv_bfloat16* p, int64_t i) {
  return __bfloat162float(p[i]);
}

// One block per grouped row, 16-byte copies where the row allows.
template <typename T>
__global__ void Gather(const T* __restrict__ x, int64_t hidden,
                       const int32_t* __restrict__ row_token, T* __restrict__ out) {
  const int64_t r = blockIdx.x;
  const T* src = x + row_token[r] * hidden;
  T* dst = out + r * hidden;
  const int64_t bytes = hidden * static_cast<int64_t>(sizeof(T));
  if (bytes % 16 == 0 && reinterpret_cast<uintptr_t>(src) % 16 == 0 &&
      reinterpret_cast<uintptr_t>(dst) % 16 == 0) {
    const int4* s = reinterpret_cast<const int4*>(src);
    int4* d = reinterpret_cast<int4*>(dst);
    for (int64_t i = threadIdx.x; i < bytes / 16; i += blockDim.x) d[i] = s[i];
  } else {
    for (int64_t i = threadIdx.x; i < hidden; i += blockDim.x) dst[i] = src[i];
  }
}

// One block per token; each thread accumulates its columns over the k rows in j order.
template <typename T>
__global__ void Combine(const T* __restrict__ y, int64_t hidden,
                        const int32_t* __restrict__ slot_row, const float* __restrict__ weights,
                        int top_k, float* __restrict__ out) {
  const int64_t t = blockIdx.x;
  const int32_t* rows = slot_row + t * top_k;
  const float* w = weights + t * top_k;
  for (int64_t c = threadIdx.x; c < hidden; c += blockDim.x) {
    float acc = 0.0f;
    for (int j = 0; j < top_k; ++j) acc += w[j] * Load(y, rows[j] * hidden + c);
    out[t * hidden + c] = acc;
  }
}

int Blocks(int64_t n) { return static_cast<int>(std::min<int64_t>((n + 255) / 256, 65535)); }

}  // namespace

size_t PermutationWorkspaceBytes(int64_t slots, int num_experts) {
  return MakeLayout(slots, CubBytes(slots, num_experts)).total;
}

cudaError_t BuildPermutation(const int32_t* topk_ids, int64_t num_tokens, int top_k,
                             int num_experts, void* workspace, size_t workspace_bytes,
                             const DevicePermutation& out, cudaStream_t stream) {
  const int64_t slots = num_tokens * top_k;
  if (num_tokens < 0 || top_k <= 0 || num_experts <= 0 || slots > INT32_MAX)
    return cudaErrorInvalidValue;
  size_t cub_bytes = CubBytes(slots, num_experts);
  const Layout l = MakeLayout(slots, cub_bytes);
  if (workspace_bytes < l.total) return cudaErrorInvalidValue;
  char* ws = static_cast<char*>(workspace);
  auto* keys_out = reinterpret_cast<int32_t*>(ws + l.keys_out);
  auto* vals_in = reinterpret_cast<int32_t*>(ws + l.vals_in);
  auto* vals_out = reinterpret_cast<int32_t*>(ws + l.vals_out);
  ForgetEarlierErrors();
  if (slots > 0) {
    Iota<<<Blocks(slots), 256, 0, stream>>>(vals_in, slots);
    // Stable: slots of one expert stay in token order.
    cudaError_t e = cub::DeviceRadixSort::SortPairs(ws + l.cub, cub_bytes, topk_ids, keys_out,
                                                    vals_in, vals_out, static_cast<int>(slots), 0,
                                                    KeyBits(num_experts), stream);
    if (e != cudaSuccess) return e;
    Scatter<<<Blocks(slots), 256, 0, stream>>>(vals_out, slots, top_k, out.row_token, out.slot_row);
  }
  Offsets<<<(num_experts + 1 + 255) / 256, 256, 0, stream>>>(keys_out, slots, num_experts,
                                                             out.expert_offsets);
  return cudaGetLastError();
}

cudaError_t GatherRows(RowDType dtype, const void* x, int64_t hidden, const int32_t* row_token,
                       int64_t rows, void* out, cudaStream_t stream) {
  if (rows <= 0) return cudaSuccess;
  if (hidden <= 0 || rows > INT32_MAX) return cudaErrorInvalidValue;
  ForgetEarlierErrors();
  if (dtype == RowDType::kBF16) {
    Gather<<<static_cast<unsigned>(rows), 256, 0, stream>>>(
        static_cast<const __nv_bfloat16*>(x), hidden, row_token, static_cast<__nv_bfloat16*>(out));
  } else {
    Gather<<<static_cast<unsigned>(rows), 256, 0, stream>>>(static_cast<const float*>(x), hidden,
                                                            row_token, static_cast<float*>(out));
  }
  return cudaGetLastError();
}

cudaError_t CombineRows(RowDType dtype, const void* y, int64_t hidden, const int32_t* slot_row,
                        const float* weights, int64_t num_tokens, int top_k, float* out,
                        cudaStream_t stream) {
  if (num_tokens <= 0) return cudaSuccess;
  if (hidden <= 0 || top_k <= 0 || num_tokens > INT32_MAX) return cudaErrorInvalidValue;
  ForgetEarlierErrors();
  if (dtype == RowDType::kBF16) {
    Combine<<<static_cast<unsigned>(num_tokens), 256, 0, stream>>>(
        static_cast<const __nv_bfloat16*>(y), hidden, slot_row, weights, top_k, out);
  } else {
    Combine<<<static_cast<unsigned>(num_tokens), 256, 0, stream>>>(
        static_cast<const float*>(y), hidden, slot_row, weights, top_k, out);
  }
  return cudaGetLastError();
}

}  // namespace moemesh::cuda
