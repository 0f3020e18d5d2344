// Tensor: the one tensor type of MoE Mesh. A dtype, a row-major shape and a pointer to
// bytes whose lifetime a shared keep-alive handle guarantees: either an owned,
// 64-byte-aligned heap buffer or a view into something else (a memory-mapped
// checkpoint, a request's payload). Copying a Tensor copies the handle, not the bytes.
// Not synchronised: concurrent writers to one buffer must coordinate themselves.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "kernels/dtype.h"

namespace moemesh {

class Tensor {
 public:
  Tensor() = default;

  // Uninitialised owned tensor. Sizes must be non-negative.
  static Tensor Empty(DType dtype, std::vector<int64_t> shape);
  // Owned tensor filled with zeros.
  static Tensor Zeros(DType dtype, std::vector<int64_t> shape);
  // View of `data`; `owner` keeps it alive (may be null if the caller guarantees it).
  static Tensor View(DType dtype, std::vector<int64_t> shape, const void* data,
                     std::shared_ptr<const void> owner);

  bool defined() const { return data_ != nullptr || numel() == 0; }
  DType dtype() const { return dtype_; }
  const std::vector<int64_t>& shape() const { return shape_; }
  int rank() const { return static_cast<int>(shape_.size()); }
  int64_t dim(int i) const { return shape_[i]; }
  int64_t numel() const;
  size_t nbytes() const { return static_cast<size_t>(numel()) * DTypeSize(dtype_); }

  const void* raw() const { return data_; }
  // Writable only for owned tensors; views of read-only memory must not be written.
  void* mutable_raw() { return const_cast<void*>(data_); }
  template <typename T>
  const T* data() const {
    return static_cast<const T*>(data_);
  }
  template <typename T>
  T* mutable_data() {
    return static_cast<T*>(mutable_raw());
  }

  // The index-th slice along the outermost dimension, as a view sharing the owner.
  Tensor Slice(int64_t index) const;
  // Same bytes, new shape with the same element count.
  absl::StatusOr<Tensor> Reshape(std::vector<int64_t> shape) const;
  // Owned float32 copy (F32, BF16, F16, F64, F8_E4M3 sources); error for other dtypes.
  absl::StatusOr<Tensor> ToF32() const;
  // Owned copy converted from float32 to `dtype`; this tensor must be F32.
  absl::StatusOr<Tensor> FromF32(DType dtype) const;

  // "BF16[4, 8]"
  std::string DebugString() const;

 private:
  DType dtype_ = DType::kF32;
  std::vector<int64_t> shape_;
  const void* data_ = nullptr;
  std::shared_ptr<const void> owner_;
};

// "[4, 8]"
std::string ShapeString(const std::vector<int64_t>& shape);

}  // namespace moemesh
