#include "kernels/dtype.h"

#include <gtest/gtest.h>

#include <bit>
#include <cmath>
#include <random>
#include <vector>

namespace moemesh {
namespace {

TEST(DTypeTest, NamesRoundTrip) {
  for (int i = 0; i <= static_cast<int>(DType::kF8E5M2); ++i) {
    const DType d = static_cast<DType>(i);
    auto parsed = DTypeFromName(DTypeName(d));
    ASSERT_TRUE(parsed.has_value()) << DTypeName(d);
    EXPECT_EQ(*parsed, d);
  }
  EXPECT_FALSE(DTypeFromName("F4").has_value());
  EXPECT_FALSE(DTypeFromName("f32").has_value());
  EXPECT_EQ(DTypeSize(DType::kBF16), 2u);
  EXPECT_EQ(DTypeSize(DType::kI64), 8u);
}

TEST(DTypeTest, Bf16RoundsToNearestEven) {
  EXPECT_EQ(F32ToBf16(1.0f), 0x3f80);
  // 1 + 2^-8 is exactly half-way between two bf16 values: ties go to the even one.
  EXPECT_EQ(F32ToBf16(1.0f + std::ldexp(1.0f, -8)), 0x3f80);
  EXPECT_EQ(F32ToBf16(1.0f + 3 * std::ldexp(1.0f, -8)), 0x3f82);
  EXPECT_TRUE(std::isnan(Bf16ToF32(F32ToBf16(std::nanf("")))));
  EXPECT_EQ(Bf16ToF32(F32ToBf16(INFINITY)), INFINITY);
  for (uint32_t h = 0; h < 65536; ++h) {
    const float f = Bf16ToF32(static_cast<uint16_t>(h));
    if (std::isnan(f)) continue;
    ASSERT_EQ(F32ToBf16(f), h);
  }
}

TEST(DTypeTest, F16ExhaustiveRoundTrip) {
  for (uint32_t h = 0; h < 65536; ++h) {
    const float f = F16ToF32(static_cast<uint16_t>(h));
    const _Float16 ref = std::bit_cast<_Float16>(static_cast<uint16_t>(h));
    if (std::isnan(f)) {
      ASSERT_TRUE(std::isnan(static_cast<float>(ref)));
      ASSERT_TRUE(std::isnan(F16ToF32(F32ToF16(f))));
      continue;
    }
    ASSERT_EQ(f, static_cast<float>(ref)) << h;
    ASSERT_EQ(F32ToF16(f), h);
  }
}

TEST(DTypeTest, F16RoundingMatchesCompiler) {
  std::mt19937 rng(7);
  std::uniform_int_distribution<uint32_t> bits;
  for (int i = 0; i < 1000000; ++i) {
    const float f = std::bit_cast<float>(bits(rng));
    if (std::isnan(f)) continue;
    const uint16_t ref = std::bit_cast<uint16_t>(static_cast<_Float16>(f));
    ASSERT_EQ(F32ToF16(f), ref) << f;
  }
}

TEST(DTypeTest, F8E4M3) {
  EXPECT_EQ(F8E4M3ToF32(0x38), 1.0f);          // 0.0111.000
  EXPECT_EQ(F8E4M3ToF32(0x7e), 448.0f);        // largest finite
  EXPECT_EQ(F8E4M3ToF32(0x01), 0.001953125f);  // smallest subnormal 2^-9
  EXPECT_EQ(F8E4M3ToF32(0xb8), -1.0f);
  EXPECT_TRUE(std::isnan(F8E4M3ToF32(0x7f)));
}

TEST(DTypeTest, Fp4E2M1EveryCode) {
  const float want[16] = {0, 0.5f, 1, 1.5f, 2, 3, 4, 6, -0.0f, -0.5f, -1, -1.5f, -2, -3, -4, -6};
  for (uint8_t code = 0; code < 16; ++code) {
    EXPECT_EQ(Fp4E2M1ToF32(code), want[code]) << int(code);
    EXPECT_EQ(std::signbit(Fp4E2M1ToF32(code)), code >= 8) << int(code);
  }
}

TEST(DTypeTest, Mxfp4LowNibbleFirstScaledByBlock) {
  // Two rows of two blocks; each block's bytes hold (low, high) = (j % 16, 15 - j % 16).
  std::vector<uint8_t> blocks(2 * 2 * 16);
  for (size_t i = 0; i < blocks.size(); ++i) {
    blocks[i] = static_cast<uint8_t>((i % 16) | ((15 - i % 16) << 4));
  }
  const uint8_t scales[4] = {127, 128, 125, 0};  // 2^0, 2^1, 2^-2, 2^-127
  std::vector<float> out(2 * 64, std::nanf(""));
  DequantizeMxfp4(blocks.data(), scales, 2, 2, out.data());
  for (int b = 0; b < 4; ++b) {
    const double scale = std::ldexp(1.0, scales[b] - 127);
    for (int j = 0; j < 16; ++j) {
      EXPECT_EQ(out[b * 32 + 2 * j], static_cast<float>(Fp4E2M1ToF32(j) * scale)) << b << " " << j;
      EXPECT_EQ(out[b * 32 + 2 * j + 1], static_cast<float>(Fp4E2M1ToF32(15 - j) * scale))
          << b << " " << j;
    }
  }
  EXPECT_EQ(out[32 + 2 * 7], 12.0f);      // code 7 (6.0) in a 2^1 block
  EXPECT_EQ(out[96 + 2 * 2], 0x1p-127f);  // code 2 (1.0) in a 2^-127 block: subnormal, exact
}

TEST(DTypeTest, Mxfp4EveryCodeAtEveryScaleIsLdexp) {
  // One row per scale byte, each block holding every code twice (low and high nibble).
  std::vector<uint8_t> blocks(256 * 16), scales(256);
  for (int s = 0; s < 256; ++s) {
    scales[s] = static_cast<uint8_t>(s);
    for (int j = 0; j < 16; ++j) blocks[s * 16 + j] = static_cast<uint8_t>(j | ((15 - j) << 4));
  }
  std::vector<float> out(256 * 32);
  DequantizeMxfp4(blocks.data(), scales.data(), 256, 1, out.data());
  for (int s = 0; s < 256; ++s) {
    for (int j = 0; j < 16; ++j) {
      for (int half = 0; half < 2; ++half) {
        const float want = std::ldexp(Fp4E2M1ToF32(half ? 15 - j : j), s - 127);
        const float got = out[s * 32 + 2 * j + half];
        ASSERT_TRUE(got == want && std::signbit(got) == std::signbit(want))
            << "scale " << s << " code " << (half ? 15 - j : j) << ": " << got << " vs " << want;
      }
    }
  }
}

TEST(DTypeTest, BlockFp8ScalesEachBlockIncludingPartialEdges) {
  // 5 x 7 weights in 2 x 3 blocks: scale grid 3 x 3, the last row and column partial.
  const int64_t rows = 5, cols = 7, br = 2, bc = 3;
  std::vector<uint8_t> w(rows * cols);
  for (size_t i = 0; i < w.size(); ++i) w[i] = static_cast<uint8_t>(0x30 + i);  // 0.5 .. ~2
  std::vector<float> scale(9);
  for (size_t i = 0; i < scale.size(); ++i) scale[i] = 0.25f * static_cast<float>(i + 1);
  std::vector<float> out(w.size(), std::nanf(""));
  DequantizeBlockFp8(w.data(), rows, cols, scale.data(), br, bc, out.data());
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < cols; ++c) {
      EXPECT_EQ(out[r * cols + c], F8E4M3ToF32(w[r * cols + c]) * scale[(r / br) * 3 + c / bc])
          << r << "," << c;
    }
  }
  EXPECT_EQ(out[4 * cols + 6], F8E4M3ToF32(w[4 * cols + 6]) * 2.25f);  // corner block (2, 2)
}

TEST(DTypeTest, BulkConversions) {
  std::vector<float> src = {0.5f, -2.25f, 3.0e-3f, 65504.0f};
  std::vector<uint16_t> half(src.size());
  std::vector<float> back(src.size());
  ASSERT_TRUE(ConvertFromF32(src.data(), src.size(), DType::kF16, half.data()));
  ASSERT_TRUE(ConvertToF32(DType::kF16, half.data(), half.size(), back.data()));
  for (size_t i = 0; i < src.size(); ++i) EXPECT_NEAR(back[i], src[i], 1e-3 * std::abs(src[i]));
  int32_t ints[2] = {1, 2};
  EXPECT_FALSE(ConvertToF32(DType::kI32, ints, 2, back.data()));
}

}  // namespace
}  // namespace moemesh
