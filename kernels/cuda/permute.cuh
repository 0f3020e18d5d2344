// Permute and combine on the GPU: the device counterpart of kernels/cpu/dispatch (token
// choice, dropless). Host launchers only.
//
// BuildPermutation groups the T·k (token, choice) slots by expert with a stable radix
// sort of their expert ids, so the rows of expert e are [expert_offsets[e],
// expert_offsets[e+1]) in token order, exactly as BuildTokenChoicePlan lays them out; all
// of it on the GPU (no copy of the counts to the host). GatherRows fills the grouped
// buffer; CombineRows reads each token's k rows back in its top-k order with its
// weights, FP32 accumulation, so the result does not depend on where rows were computed.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

namespace moemesh::cuda {

enum class RowDType : uint8_t { kF32, kBF16 };

// Device arrays of a permutation of `slots` = T·k rows.
struct DevicePermutation {
  int64_t* expert_offsets = nullptr;  // [E+1]
  int32_t* row_token = nullptr;       // [slots] source token of each grouped row
  int32_t* slot_row = nullptr;        // [slots] grouped row of slot t·k + j
};

// Scratch bytes BuildPermutation needs for T·k slots over E experts.
size_t PermutationWorkspaceBytes(int64_t slots, int num_experts);

// Fills `out` from topk_ids [T, k]. Ids must be in [0, E): the routing kernel's are;
// validate ids that come from elsewhere (they are not checked on the device).
cudaError_t BuildPermutation(const int32_t* topk_ids, int64_t num_tokens, int top_k,
                             int num_experts, void* workspace, size_t workspace_bytes,
                             const DevicePermutation& out, cudaStream_t stream);

// out[r, :] = x[row_token[r], :] for r in [0, rows); x and out of `dtype`, `hidden` wide.
cudaError_t GatherRows(RowDType dtype, const void* x, int64_t hidden, const int32_t* row_token,
                       int64_t rows, void* out, cudaStream_t stream);

// out[t, :] = Σ_j weights[t, j] · y[slot_row[t·k + j], :] in j order, FP32 accumulation;
// y of `dtype`, out float32 [T, hidden].
cudaError_t CombineRows(RowDType dtype, const void* y, int64_t hidden, const int32_t* slot_row,
                        const float* weights, int64_t num_tokens, int top_k, float* out,
                        cudaStream_t stream);

}  // namespace moemesh::cuda
