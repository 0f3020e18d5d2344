#include "services/moe/layer_io.h"

#include <utility>

#include "absl/strings/str_cat.h"

namespace moemesh {

absl::StatusOr<Tensor> HiddenStatesAsF32(const Tensor& hidden, int64_t hidden_size) {
  if (hidden.rank() != 2 || hidden.dim(1) != hidden_size) {
    return absl::InvalidArgumentError(absl::StrCat("hidden_states has shape ",
                                                   ShapeString(hidden.shape()), ", expected [T, ",
                                                   hidden_size, "]"));
  }
  if (!IsFloatingActivation(hidden.dtype())) {
    return absl::InvalidArgumentError(absl::StrCat(
        "hidden_states has dtype ", DTypeName(hidden.dtype()), ", expected F32, BF16 or F16"));
  }
  if (hidden.dim(0) == 0) return absl::InvalidArgumentError("hidden_states has no tokens (T = 0)");
  if (hidden.dtype() == DType::kF32) return hidden;
  return hidden.ToF32();
}

absl::StatusOr<Tensor> OutputAs(Tensor y, DType dtype) {
  if (dtype == DType::kF32) return y;
  return y.FromF32(dtype);
}

}  // namespace moemesh
