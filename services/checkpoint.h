// A Hugging Face checkpoint folder: config.json plus model.safetensors or the shards
// named by model.safetensors.index.json. The one place that reads checkpoints.
//
// Shards are memory-mapped; Get() returns zero-copy views, so only the tensors a
// caller asks for are ever read from disk. Errors name the file and the tensor.
// Thread-safe after Open.
#pragma once

#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "nlohmann/json.hpp"
#include "services/safetensors.h"
#include "services/tensor.h"

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
  // Get(name, shape) converted to an owned float32 tensor (F32, BF16, F16 on disk).
  absl::StatusOr<Tensor> GetF32(absl::string_view name, const std::vector<int64_t>& shape) const;
  std::vector<std::string> TensorNames() const;

 private:
  Checkpoint() = default;
  std::string dir_;
  nlohmann::json config_;
  std::vector<std::unique_ptr<SafetensorsFile>> files_;
  // tensor name -> (file index, entry)
  std::map<std::string, std::pair<size_t, const SafetensorsEntry*>, std::less<>> tensors_;
};

}  // namespace moemesh
