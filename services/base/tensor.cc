#include "services/base/tensor.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <new>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace moemesh {

int64_t Tensor::numel() const {
  int64_t n = 1;
  for (int64_t d : shape_) n *= d;
  return n;
}

Tensor Tensor::Empty(DType dtype, std::vector<int64_t> shape) {
  Tensor t;
  t.dtype_ = dtype;
  t.shape_ = std::move(shape);
  // Round up to the alignment, and allocate at least one line so data_ is never null.
  const size_t bytes = (std::max<size_t>(t.nbytes(), 1) + 63) / 64 * 64;
  void* p = std::aligned_alloc(64, bytes);
  if (p == nullptr) throw std::bad_alloc();
  t.owner_ = std::shared_ptr<void>(p, std::free);
  t.data_ = p;
  return t;
}

Tensor Tensor::Zeros(DType dtype, std::vector<int64_t> shape) {
  Tensor t = Empty(dtype, std::move(shape));
  std::memset(t.mutable_raw(), 0, t.nbytes());
  return t;
}

Tensor Tensor::View(DType dtype, std::vector<int64_t> shape, const void* data,
                    std::shared_ptr<const void> owner) {
  Tensor t;
  t.dtype_ = dtype;
  t.shape_ = std::move(shape);
  t.data_ = data;
  t.owner_ = std::move(owner);
  return t;
}

Tensor Tensor::Slice(int64_t index) const {
  std::vector<int64_t> inner(shape_.begin() + 1, shape_.end());
  Tensor t = View(dtype_, std::move(inner), nullptr, owner_);
  t.data_ = static_cast<const char*>(data_) + index * t.nbytes();
  return t;
}

absl::StatusOr<Tensor> Tensor::Reshape(std::vector<int64_t> shape) const {
  Tensor t = View(dtype_, std::move(shape), data_, owner_);
  // Negative sizes could multiply out to the right count: (-2)·(-3) == 2·3.
  const bool negative =
      std::any_of(t.shape_.begin(), t.shape_.end(), [](int64_t d) { return d < 0; });
  if (negative || t.numel() != numel()) {
    return absl::InvalidArgumentError(
        absl::StrCat("cannot reshape ", DebugString(), " to ", ShapeString(t.shape())));
  }
  return t;
}

absl::StatusOr<Tensor> Tensor::ToF32() const {
  Tensor out = Empty(DType::kF32, shape_);
  if (!ConvertToF32(dtype_, data_, numel(), out.mutable_data<float>())) {
    return absl::InvalidArgumentError(
        absl::StrCat("cannot convert ", DTypeName(dtype_), " to F32"));
  }
  return out;
}

absl::StatusOr<Tensor> Tensor::FromF32(DType dtype) const {
  if (dtype_ != DType::kF32) {
    return absl::InvalidArgumentError(absl::StrCat("FromF32 on a ", DTypeName(dtype_), " tensor"));
  }
  Tensor out = Empty(dtype, shape_);
  if (!ConvertFromF32(data<float>(), numel(), dtype, out.mutable_raw())) {
    return absl::InvalidArgumentError(absl::StrCat("cannot convert F32 to ", DTypeName(dtype)));
  }
  return out;
}

std::string Tensor::DebugString() const {
  return absl::StrCat(DTypeName(dtype_), ShapeString(shape_));
}

std::string ShapeString(const std::vector<int64_t>& shape) {
  return absl::StrCat("[", absl::StrJoin(shape, ", "), "]");
}

}  // namespace moemesh
