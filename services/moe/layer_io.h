// What goes into and comes out of one MoE layer call, whoever computes it: MoeLayer in
// process, or the router through the mesh.
#pragma once

#include <cstdint>

#include "absl/status/statusor.h"
#include "services/base/tensor.h"

namespace moemesh {

struct MoeLayerOutput {
  Tensor output;        // [T, H], the input's dtype
  Tensor topk_ids;      // I32 [T, k]; expert choice: the first k experts that took the
                        // token, in expert order, padded with -1
  Tensor topk_weights;  // F32 [T, k]; 0 where topk_ids is -1
  int64_t dropped = 0;  // (token, choice) slots dropped by the capacity limit
};

// Checks hidden_states for a layer of width `hidden_size` ([T, hidden_size], T > 0, F32,
// BF16 or F16) and returns it as F32 (the same tensor when it already is).
// INVALID_ARGUMENT naming what is wrong.
absl::StatusOr<Tensor> HiddenStatesAsF32(const Tensor& hidden, int64_t hidden_size);

// The layer's float32 output [T, H] as `dtype` (the input's): the same tensor for F32.
absl::StatusOr<Tensor> OutputAs(Tensor y, DType dtype);

}  // namespace moemesh
