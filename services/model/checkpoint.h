// A Hugging Face checkpoint folder: config.json plus model.safetensors or the shards
// named by model.safetensors.index.json. The one place that reads checkpoints.
//
// Shards are memory-mapped; Get() returns zero-copy views, so only the tensors a
// caller asks for are ever read from disk. Errors name the file and the tensor.
// Thread-safe after Open.
//
// Quantized releases are read by dequantizing to float32 as tensors are asked for:
// block-scaled FP8 (config quantization_config {quant_method: fp8, weight_block_size},
// an F8_E4M3 `<name>` with float `<name>_scale_inv`; DeepSeek-V3, Qwen3 FP8) through
// GetF32, and MXFP4 (`<stem>_blocks`, `<stem>_scales`; GPT-OSS) through GetMxfp4.
#pragma once

#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "nlohmann/json.hpp"
#include "services/base/tensor.h"
#include "services/model/safetensors.h"

namespace moemesh {

class Checkpoint {
 public:
  static absl::StatusOr<std::unique_ptr<Checkpoint>> Open(const std::string& dir);

  const std::string& dir() const { return dir_; }
  const nlohmann::json& config() const { return config_; }
  bool Has(absl::string_view name) const;
  // The shard path holding `name` ("" when absent).
  std::string FileOf(absl::string_view name) const;
  // Zero-copy view in the on-disk dtype, or NOT_FOUND naming the checkpoint and tensor.
  absl::StatusOr<Tensor> Get(absl::string_view name) const;
  // Like Get, then checks the shape: INVALID_ARGUMENT naming file, tensor, both shapes.
  absl::StatusOr<Tensor> Get(absl::string_view name, const std::vector<int64_t>& shape) const;
  // Get(name, shape) converted to an owned float32 tensor: F32, BF16 or F16 on disk, or a
  // 2-D F8_E4M3 weight with its block scales `<name>_scale_inv`.
  absl::StatusOr<Tensor> GetF32(absl::string_view name, const std::vector<int64_t>& shape) const;
  // GetF32 into caller memory of shape's element count (no temporary tensor).
  absl::Status ReadF32(absl::string_view name, const std::vector<int64_t>& shape, float* dst) const;
  // Entry `index` of the stacked tensor `name` of `shape` (F32, BF16 or F16 on disk; e.g.
  // one expert of a fused [E, ...] tensor) as an owned float32 tensor of shape[1:].
  absl::StatusOr<Tensor> GetSliceF32(absl::string_view name, const std::vector<int64_t>& shape,
                                     int64_t index) const;
  // Entry `index` of an MXFP4-packed stack of `shape` = {N, rows, cols}: reads
  // `<stem>_blocks` U8 [N, rows, cols/32, 16] and `<stem>_scales` U8 [N, rows, cols/32] and
  // returns float32 [rows, cols] (row-major, as the packed rows lie; no transpose).
  absl::StatusOr<Tensor> GetMxfp4(absl::string_view stem, int64_t index,
                                  const std::vector<int64_t>& shape) const;
  std::vector<std::string> TensorNames() const;

 private:
  Checkpoint() = default;
  absl::Status ReadQuantization(const std::string& config_path);
  absl::Status DequantizeFp8(absl::string_view name, const Tensor& weight, float* dst) const;
  // `t` (the view of tensor `name`) as float32 into dst.
  absl::Status ConvertInto(absl::string_view name, const Tensor& t, float* dst) const;
  // INVALID_ARGUMENT naming the file, the tensor, its dtype and the expected ones.
  absl::Status WrongDType(absl::string_view name, DType dtype, absl::string_view expected) const;

  std::string dir_;
  nlohmann::json config_;
  std::string quant_method_;           // quantization_config.quant_method, "" when absent
  int64_t fp8_block_[2] = {128, 128};  // quantization_config.weight_block_size
  std::vector<std::unique_ptr<SafetensorsFile>> files_;
  // tensor name -> (file index, entry)
  std::map<std::string, std::pair<size_t, const SafetensorsEntry*>, std::less<>> tensors_;
};

}  // namespace moemesh
