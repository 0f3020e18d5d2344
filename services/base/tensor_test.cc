#include "services/base/tensor.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#include "absl/status/status.h"

namespace moemesh {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;

Tensor F32Iota(std::vector<int64_t> shape) {
  Tensor t = Tensor::Empty(DType::kF32, std::move(shape));
  for (int64_t i = 0; i < t.numel(); ++i) t.mutable_data<float>()[i] = static_cast<float>(i);
  return t;
}

TEST(TensorTest, DefaultTensorIsUndefined) {
  Tensor t;
  EXPECT_FALSE(t.defined());
  EXPECT_EQ(t.raw(), nullptr);
}

TEST(TensorTest, EmptyHasShapeSizesAndAlignment) {
  Tensor t = Tensor::Empty(DType::kBF16, {3, 5});
  EXPECT_TRUE(t.defined());
  EXPECT_EQ(t.dtype(), DType::kBF16);
  EXPECT_THAT(t.shape(), ElementsAre(3, 5));
  EXPECT_EQ(t.rank(), 2);
  EXPECT_EQ(t.dim(0), 3);
  EXPECT_EQ(t.dim(1), 5);
  EXPECT_EQ(t.numel(), 15);
  EXPECT_EQ(t.nbytes(), 30u);
  EXPECT_EQ(reinterpret_cast<uintptr_t>(t.raw()) % 64, 0u);
}

TEST(TensorTest, ScalarHasOneElement) {
  Tensor t = Tensor::Empty(DType::kF64, {});
  EXPECT_EQ(t.rank(), 0);
  EXPECT_EQ(t.numel(), 1);
  EXPECT_EQ(t.nbytes(), 8u);
}

TEST(TensorTest, ZeroSizedTensorIsDefinedWithNoBytes) {
  Tensor t = Tensor::Zeros(DType::kF32, {4, 0});
  EXPECT_TRUE(t.defined());
  EXPECT_EQ(t.numel(), 0);
  EXPECT_EQ(t.nbytes(), 0u);
  EXPECT_NE(t.raw(), nullptr);
}

TEST(TensorTest, ZerosIsAllZeroBytes) {
  Tensor t = Tensor::Zeros(DType::kU8, {7, 9});
  const auto* p = t.data<uint8_t>();
  for (int64_t i = 0; i < t.numel(); ++i) ASSERT_EQ(p[i], 0) << "byte " << i;
}

TEST(TensorTest, CopiesShareBytes) {
  Tensor a = F32Iota({4});
  Tensor b = a;
  b.mutable_data<float>()[2] = 42.0f;
  EXPECT_EQ(a.data<float>()[2], 42.0f);
}

TEST(TensorTest, ViewPointsAtDataAndKeepsOwnerAlive) {
  auto buffer = std::make_shared<std::vector<float>>(std::vector<float>{1, 2, 3, 4, 5, 6});
  Tensor v = Tensor::View(DType::kF32, {2, 3}, buffer->data(), buffer);
  EXPECT_EQ(v.raw(), buffer->data());
  std::weak_ptr<std::vector<float>> weak = buffer;
  buffer.reset();
  ASSERT_FALSE(weak.expired());
  EXPECT_EQ(v.data<float>()[5], 6.0f);
  v = Tensor();
  EXPECT_TRUE(weak.expired());
}

TEST(TensorTest, SliceIsAViewOfTheOuterIndex) {
  Tensor t = F32Iota({3, 2, 2});
  Tensor s = t.Slice(2);
  EXPECT_THAT(s.shape(), ElementsAre(2, 2));
  EXPECT_EQ(s.dtype(), DType::kF32);
  EXPECT_EQ(s.raw(), t.data<float>() + 8);
  EXPECT_EQ(s.data<float>()[0], 8.0f);
  EXPECT_EQ(s.data<float>()[3], 11.0f);
}

TEST(TensorTest, SliceKeepsTheBufferAlive) {
  Tensor s = F32Iota({2, 3}).Slice(1);
  EXPECT_EQ(s.data<float>()[0], 3.0f);
  EXPECT_EQ(s.data<float>()[2], 5.0f);
}

TEST(TensorTest, SliceOfAVectorIsAScalar) {
  Tensor s = F32Iota({5}).Slice(4);
  EXPECT_EQ(s.rank(), 0);
  EXPECT_EQ(s.numel(), 1);
  EXPECT_EQ(s.data<float>()[0], 4.0f);
}

TEST(TensorTest, ReshapeSharesBytes) {
  Tensor t = F32Iota({2, 6});
  absl::StatusOr<Tensor> r = t.Reshape({3, 4});
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_THAT(r->shape(), ElementsAre(3, 4));
  EXPECT_EQ(r->raw(), t.raw());
  // The original keeps its shape.
  EXPECT_THAT(t.shape(), ElementsAre(2, 6));
}

TEST(TensorTest, ReshapeToADifferentElementCountFails) {
  absl::StatusOr<Tensor> r = F32Iota({2, 3}).Reshape({4, 2});
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(r.status().message(), HasSubstr("F32[2, 3]"));
  EXPECT_THAT(r.status().message(), HasSubstr("[4, 2]"));
}

TEST(TensorTest, ReshapeRejectsNegativeDimensions) {
  // (-2)·(-3) == 6 == 2·3: the element count alone would accept this.
  absl::StatusOr<Tensor> r = F32Iota({2, 3}).Reshape({-2, -3});
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(r.status().message(), HasSubstr("[-2, -3]"));
}

TEST(TensorTest, ToF32ConvertsEveryFloatingType) {
  // 1.5, -2, 0.25 and 448 are exact in every source type (448 is F8_E4M3's max).
  const std::vector<float> want = {1.5f, -2.0f, 0.25f, 448.0f};
  for (DType dtype : {DType::kF32, DType::kBF16, DType::kF16, DType::kF64}) {
    Tensor src = Tensor::Empty(DType::kF32, {2, 2});
    std::memcpy(src.mutable_raw(), want.data(), src.nbytes());
    absl::StatusOr<Tensor> typed = src.FromF32(dtype);
    ASSERT_TRUE(typed.ok()) << DTypeName(dtype) << ": " << typed.status();
    EXPECT_EQ(typed->dtype(), dtype);
    EXPECT_EQ(typed->nbytes(), 4 * DTypeSize(dtype));
    absl::StatusOr<Tensor> back = typed->ToF32();
    ASSERT_TRUE(back.ok()) << back.status();
    EXPECT_THAT(back->shape(), ElementsAre(2, 2));
    EXPECT_EQ(back->dtype(), DType::kF32);
    EXPECT_NE(back->raw(), typed->raw());
    for (int i = 0; i < 4; ++i) EXPECT_EQ(back->data<float>()[i], want[i]) << DTypeName(dtype);
  }
}

TEST(TensorTest, ToF32ConvertsF8E4M3) {
  // e4m3fn: 0x38 = 1.0, 0xC0 = -2.0, 0x7E = 448, 0x01 = 2^-9 (smallest subnormal).
  const uint8_t bytes[] = {0x38, 0xC0, 0x7E, 0x01};
  Tensor t = Tensor::View(DType::kF8E4M3, {4}, bytes, nullptr);
  absl::StatusOr<Tensor> f = t.ToF32();
  ASSERT_TRUE(f.ok()) << f.status();
  EXPECT_EQ(f->data<float>()[0], 1.0f);
  EXPECT_EQ(f->data<float>()[1], -2.0f);
  EXPECT_EQ(f->data<float>()[2], 448.0f);
  EXPECT_EQ(f->data<float>()[3], 0.001953125f);
}

TEST(TensorTest, ConversionsReadUnalignedViews) {
  // Checkpoint tensors are packed back to back, so views can start at any byte.
  alignas(8) uint8_t buffer[1 + 3 * sizeof(float)] = {};
  const float values[] = {1.5f, -3.0f, 0.125f};
  std::memcpy(buffer + 1, values, sizeof values);
  Tensor f32 = Tensor::View(DType::kF32, {3}, buffer + 1, nullptr);
  absl::StatusOr<Tensor> bf16 = f32.FromF32(DType::kBF16);
  ASSERT_TRUE(bf16.ok()) << bf16.status();
  std::memcpy(buffer + 1, bf16->raw(), bf16->nbytes());
  absl::StatusOr<Tensor> back = Tensor::View(DType::kBF16, {3}, buffer + 1, nullptr).ToF32();
  ASSERT_TRUE(back.ok()) << back.status();
  for (int i = 0; i < 3; ++i) EXPECT_EQ(back->data<float>()[i], values[i]);
}

TEST(TensorTest, FromF32RoundsToNearestEven) {
  // 1 + 2^-8 lies halfway between two BF16 values: ties go to the even one, 1.0.
  // 1 + 3·2^-8 lies halfway too: the even neighbour is 1 + 2^-6.
  Tensor src = Tensor::Empty(DType::kF32, {2});
  src.mutable_data<float>()[0] = 1.0f + 1.0f / 256;
  src.mutable_data<float>()[1] = 1.0f + 3.0f / 256;
  absl::StatusOr<Tensor> bf16 = src.FromF32(DType::kBF16);
  ASSERT_TRUE(bf16.ok()) << bf16.status();
  absl::StatusOr<Tensor> back = bf16->ToF32();
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(back->data<float>()[0], 1.0f);
  EXPECT_EQ(back->data<float>()[1], 1.0f + 1.0f / 64);
}

TEST(TensorTest, ToF32OfAnIntegerTypeFailsNamingIt) {
  Tensor t = Tensor::Zeros(DType::kI32, {3});
  absl::StatusOr<Tensor> f = t.ToF32();
  ASSERT_FALSE(f.ok());
  EXPECT_EQ(f.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(f.status().message(), HasSubstr("I32"));
}

TEST(TensorTest, FromF32OfANonF32TensorFails) {
  Tensor t = Tensor::Zeros(DType::kBF16, {3});
  absl::StatusOr<Tensor> f = t.FromF32(DType::kF16);
  ASSERT_FALSE(f.ok());
  EXPECT_EQ(f.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(f.status().message(), HasSubstr("BF16"));
}

TEST(TensorTest, FromF32ToAnIntegerTypeFails) {
  absl::StatusOr<Tensor> f = F32Iota({3}).FromF32(DType::kU8);
  ASSERT_FALSE(f.ok());
  EXPECT_EQ(f.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(f.status().message(), HasSubstr("U8"));
}

TEST(TensorTest, DebugStringAndShapeString) {
  EXPECT_EQ(Tensor::Empty(DType::kBF16, {4, 8}).DebugString(), "BF16[4, 8]");
  EXPECT_EQ(Tensor::Empty(DType::kF8E4M3, {}).DebugString(), "F8_E4M3[]");
  EXPECT_EQ(ShapeString({}), "[]");
  EXPECT_EQ(ShapeString({0, 7}), "[0, 7]");
}

}  // namespace
}  // namespace moemesh
