#include "kernels/dtype.h"

#include <algorithm>
#include <array>
#include <bit>
#include <cmath>

namespace moemesh {
namespace {

struct DTypeInfo {
  DType dtype;
  const char* name;
  size_t size;
};

// Indexed by DType's value.
constexpr std::array<DTypeInfo, 15> kDTypes = {{
    {DType::kF32, "F32", 4},
    {DType::kBF16, "BF16", 2},
    {DType::kF16, "F16", 2},
    {DType::kF64, "F64", 8},
    {DType::kI64, "I64", 8},
    {DType::kI32, "I32", 4},
    {DType::kI16, "I16", 2},
    {DType::kI8, "I8", 1},
    {DType::kU64, "U64", 8},
    {DType::kU32, "U32", 4},
    {DType::kU16, "U16", 2},
    {DType::kU8, "U8", 1},
    {DType::kBool, "BOOL", 1},
    {DType::kF8E4M3, "F8_E4M3", 1},
    {DType::kF8E5M2, "F8_E5M2", 1},
}};

// Element i of an array that may be misaligned: safetensors packs tensors back to
// back, so a checkpoint's BF16 or F32 data can start at any byte.
template <typename T>
T LoadAt(const void* base, size_t i) {
  T v;
  std::memcpy(&v, static_cast<const char*>(base) + i * sizeof(T), sizeof(T));
  return v;
}

}  // namespace

size_t DTypeSize(DType dtype) { return kDTypes[static_cast<size_t>(dtype)].size; }

const char* DTypeName(DType dtype) { return kDTypes[static_cast<size_t>(dtype)].name; }

std::optional<DType> DTypeFromName(std::string_view name) {
  for (const DTypeInfo& info : kDTypes) {
    if (name == info.name) return info.dtype;
  }
  return std::nullopt;
}

float F16ToF32(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t mant = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0x1f) {
    bits = sign | 0x7f800000u | (mant << 13);  // inf / NaN
  } else if (exp != 0) {
    bits = sign | ((exp + 112) << 23) | (mant << 13);
  } else if (mant == 0) {
    bits = sign;
  } else {  // subnormal: renormalise
    exp = 113;
    while ((mant & 0x400u) == 0) {
      mant <<= 1;
      --exp;
    }
    bits = sign | (exp << 23) | ((mant & 0x3ffu) << 13);
  }
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

uint16_t F32ToF16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof bits);
  const uint16_t sign = static_cast<uint16_t>((bits >> 16) & 0x8000u);
  const uint32_t abs = bits & 0x7fffffffu;
  if (abs > 0x7f800000u) return sign | 0x7e00u;   // NaN
  if (abs >= 0x477ff000u) return sign | 0x7c00u;  // rounds to inf
  if (abs < 0x38800000u) {                        // subnormal or zero in half
    if (abs < 0x33000000u) return sign;           // below half of the smallest subnormal
    const uint32_t exp = abs >> 23;
    const uint32_t mant = (abs & 0x7fffffu) | 0x800000u;
    const uint32_t shift = 126 - exp;  // 14..24
    uint32_t half = mant >> shift;
    const uint32_t rem = mant & ((1u << shift) - 1);
    const uint32_t halfway = 1u << (shift - 1);
    if (rem > halfway || (rem == halfway && (half & 1u))) ++half;
    return sign | static_cast<uint16_t>(half);
  }
  uint32_t half = ((abs >> 13) - (112u << 10));
  const uint32_t rem = abs & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (half & 1u))) ++half;
  return sign | static_cast<uint16_t>(half);
}

float F8E4M3ToF32(uint8_t v) {
  // e4m3fn: bias 7, no infinities, S.1111.111 is NaN.
  const uint32_t sign = static_cast<uint32_t>(v & 0x80u) << 24;
  const uint32_t exp = (v >> 3) & 0xfu;
  const uint32_t mant = v & 0x7u;
  if (exp == 0xf && mant == 0x7) return std::bit_cast<float>(sign | 0x7fc00000u);
  float mag;
  if (exp == 0) {
    mag = static_cast<float>(mant) * 0.001953125f;  // mant · 2^-9
  } else {
    mag = std::bit_cast<float>(((exp + 120) << 23) | (mant << 20));
  }
  return sign ? -mag : mag;
}

float Fp4E2M1ToF32(uint8_t nibble) {
  // 1 sign, 2 exponent (bias 1), 1 mantissa bit: 0, 0.5, 1, 1.5, 2, 3, 4, 6.
  static constexpr float kMagnitude[8] = {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f};
  const float mag = kMagnitude[nibble & 0x7u];
  return (nibble & 0x8u) ? -mag : mag;
}

void DequantizeMxfp4(const uint8_t* blocks, const uint8_t* scales, int64_t rows, int64_t groups,
                     float* dst) {
  float lut[16];
  for (uint8_t i = 0; i < 16; ++i) lut[i] = Fp4E2M1ToF32(i);
  for (int64_t b = 0; b < rows * groups; ++b) {
    const int exponent = static_cast<int>(scales[b]) - 127;
    const uint8_t* in = blocks + b * 16;
    float* out = dst + b * 32;
    if (exponent >= -126 && exponent <= 127) {
      // 2^exponent is a normal float and the FP4 values have at most two significant bits,
      // so the product is exactly ldexp's, overflow to infinity included.
      const float scale = std::ldexp(1.0f, exponent);
      for (int j = 0; j < 16; ++j) {
        out[2 * j] = lut[in[j] & 0xfu] * scale;
        out[2 * j + 1] = lut[in[j] >> 4] * scale;
      }
    } else {
      for (int j = 0; j < 16; ++j) {
        out[2 * j] = std::ldexp(lut[in[j] & 0xfu], exponent);
        out[2 * j + 1] = std::ldexp(lut[in[j] >> 4], exponent);
      }
    }
  }
}

void DequantizeBlockFp8(const uint8_t* w, int64_t rows, int64_t cols, const float* scale_inv,
                        int64_t block_rows, int64_t block_cols, float* dst) {
  float lut[256];
  for (int i = 0; i < 256; ++i) lut[i] = F8E4M3ToF32(static_cast<uint8_t>(i));
  const int64_t scale_cols = (cols + block_cols - 1) / block_cols;
  for (int64_t r = 0; r < rows; ++r) {
    const float* scale_row = scale_inv + (r / block_rows) * scale_cols;
    const uint8_t* in = w + r * cols;
    float* out = dst + r * cols;
    for (int64_t b = 0; b < scale_cols; ++b) {
      const float scale = scale_row[b];
      const int64_t end = std::min(cols, (b + 1) * block_cols);
      for (int64_t c = b * block_cols; c < end; ++c) out[c] = lut[in[c]] * scale;
    }
  }
}

bool ConvertToF32(DType src_dtype, const void* src, size_t n, float* dst) {
  switch (src_dtype) {
    case DType::kF8E4M3: {
      const auto* s = static_cast<const uint8_t*>(src);
      for (size_t i = 0; i < n; ++i) dst[i] = F8E4M3ToF32(s[i]);
      return true;
    }
    case DType::kF32:
      std::memcpy(dst, src, n * sizeof(float));
      return true;
    case DType::kBF16:
      for (size_t i = 0; i < n; ++i) dst[i] = Bf16ToF32(LoadAt<uint16_t>(src, i));
      return true;
    case DType::kF16:
      for (size_t i = 0; i < n; ++i) dst[i] = F16ToF32(LoadAt<uint16_t>(src, i));
      return true;
    case DType::kF64:
      for (size_t i = 0; i < n; ++i) dst[i] = static_cast<float>(LoadAt<double>(src, i));
      return true;
    default:
      return false;
  }
}

bool ConvertFromF32(const float* src, size_t n, DType dst_dtype, void* dst) {
  switch (dst_dtype) {
    case DType::kF32:
      std::memcpy(dst, src, n * sizeof(float));
      return true;
    case DType::kBF16: {
      auto* d = static_cast<uint16_t*>(dst);
      for (size_t i = 0; i < n; ++i) d[i] = F32ToBf16(LoadAt<float>(src, i));
      return true;
    }
    case DType::kF16: {
      auto* d = static_cast<uint16_t*>(dst);
      for (size_t i = 0; i < n; ++i) d[i] = F32ToF16(LoadAt<float>(src, i));
      return true;
    }
    case DType::kF64: {
      auto* d = static_cast<double*>(dst);
      for (size_t i = 0; i < n; ++i) d[i] = LoadAt<float>(src, i);
      return true;
    }
    default:
      return false;
  }
}

}  // namespace moemesh
