// Element types and the one routine that converts between them.
//
// Every tensor in MoE Mesh (checkpoint, wire, kernels) names its element type with
// DType. Conversions to and from float32 live here and nowhere else. All conversions
// are exact where the target type can hold the value and round to nearest-even
// otherwise; NaN stays NaN and infinities stay infinities.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <optional>
#include <string_view>

namespace moemesh {

// Every element type the safetensors format defines; only the floating ones convert.
enum class DType : uint8_t {
  kF32,
  kBF16,
  kF16,
  kF64,
  kI64,
  kI32,
  kI16,
  kI8,
  kU64,
  kU32,
  kU16,
  kU8,
  kBool,
  kF8E4M3,  // float8 e4m3fn (DeepSeek-V3 release weights, with block scales)
  kF8E5M2,
};

// Bytes per element.
size_t DTypeSize(DType dtype);
// The safetensors spelling ("F32", "BF16", ...).
const char* DTypeName(DType dtype);
// Parses a safetensors dtype name; nullopt for names this project does not know.
std::optional<DType> DTypeFromName(std::string_view name);
// True for the floating types a tensor of activations or weights may use.
inline bool IsFloatingActivation(DType d) {
  return d == DType::kF32 || d == DType::kBF16 || d == DType::kF16;
}

inline float Bf16ToF32(uint16_t h) {
  uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

inline uint16_t F32ToBf16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof bits);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x40);  // NaN
  bits += 0x7fffu + ((bits >> 16) & 1u);  // round to nearest even
  return static_cast<uint16_t>(bits >> 16);
}

float F16ToF32(uint16_t h);
uint16_t F32ToF16(float f);

float F8E4M3ToF32(uint8_t v);
// FP4 E2M1, the element type of the MX formats: the low 4 bits of `nibble` -> value.
float Fp4E2M1ToF32(uint8_t nibble);

// MXFP4 (OCP Microscaling, as GPT-OSS releases its experts): `rows` rows of `groups`
// blocks. Block g of row r is the 16 bytes at blocks[(r·groups + g)·16], 32 FP4 values
// with the even element in each byte's low nibble, all scaled by 2^(scales[r·groups + g]
// - 127). Writes dst[rows, groups·32] exactly as Hugging Face's
// convert_moe_packed_tensors computes it before its transpose (the products are exact;
// scale byte 255 gives ±inf for non-zero values, as torch.ldexp does).
void DequantizeMxfp4(const uint8_t* blocks, const uint8_t* scales, int64_t rows, int64_t groups,
                     float* dst);

// Block-scaled FP8 (DeepSeek-V3 and the Qwen3 FP8 releases): w [rows, cols] F8_E4M3,
// scale_inv [ceil(rows/block_rows), ceil(cols/block_cols)] float32 (edge blocks may be
// partial); dst[r, c] = w[r, c] · scale_inv[r / block_rows, c / block_cols] in float32.
void DequantizeBlockFp8(const uint8_t* w, int64_t rows, int64_t cols, const float* scale_inv,
                        int64_t block_rows, int64_t block_cols, float* dst);

// Converts n elements of a floating type (F32, BF16, F16, F64, F8_E4M3) to float32.
// Returns false (and writes nothing) for non-floating types. `src` need not be aligned.
bool ConvertToF32(DType src_dtype, const void* src, size_t n, float* dst);
// Converts n float32 values to F32, BF16, F16 or F64. Returns false for other types.
// `src` need not be aligned.
bool ConvertFromF32(const float* src, size_t n, DType dst_dtype, void* dst);

}  // namespace moemesh
