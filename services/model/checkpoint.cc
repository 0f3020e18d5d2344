#include "services/model/checkpoint.h"

#include <filesystem>
#include <fstream>
#include <set>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "services/base/status_macros.h"

namespace moemesh {
namespace {

namespace fs = std::filesystem;
using Json = nlohmann::json;

absl::StatusOr<Json> ReadJson(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat(path.string(), ": cannot open"));
  std::stringstream ss;
  ss << in.rdbuf();
  Json json = Json::parse(ss.str(), nullptr, /*allow_exceptions=*/false);
  if (json.is_discarded())
    return absl::InvalidArgumentError(absl::StrCat(path.string(), ": not valid JSON"));
  if (!json.is_object())
    return absl::InvalidArgumentError(absl::StrCat(path.string(), ": not a JSON object"));
  return json;
}

}  // namespace

absl::StatusOr<std::unique_ptr<Checkpoint>> Checkpoint::Open(const std::string& dir) {
  auto ckpt = std::unique_ptr<Checkpoint>(new Checkpoint());
  ckpt->dir_ = dir;
  const fs::path root(dir);
  std::error_code ec;
  if (!fs::is_directory(root, ec)) {
    return absl::NotFoundError(absl::StrCat(dir, ": not a checkpoint directory"));
  }
  ASSIGN_OR_RETURN(ckpt->config_, ReadJson(root / "config.json"));
  RETURN_IF_ERROR(ckpt->ReadQuantization((root / "config.json").string()));

  const fs::path index_path = root / "model.safetensors.index.json";
  const fs::path single_path = root / "model.safetensors";
  std::map<std::string, std::string> weight_map;  // tensor -> shard file name
  if (fs::exists(index_path, ec)) {
    ASSIGN_OR_RETURN(Json index, ReadJson(index_path));
    const auto wm = index.find("weight_map");
    if (wm == index.end() || !wm->is_object()) {
      return absl::InvalidArgumentError(
          absl::StrCat(index_path.string(), ": missing weight_map object"));
    }
    for (auto it = wm->begin(); it != wm->end(); ++it) {
      if (!it.value().is_string()) {
        return absl::InvalidArgumentError(absl::StrCat(index_path.string(), ": weight_map entry '",
                                                       it.key(), "' is not a file name"));
      }
      const std::string shard = it.value().get<std::string>();
      // Shards must sit in the checkpoint folder: no paths that climb out of it.
      if (shard.empty() || shard.find('/') != std::string::npos || shard == "." || shard == "..") {
        return absl::InvalidArgumentError(absl::StrCat(index_path.string(), ": weight_map entry '",
                                                       it.key(), "' names an invalid shard '",
                                                       shard, "'"));
      }
      weight_map[it.key()] = shard;
    }
  } else if (!fs::exists(single_path, ec)) {
    return absl::NotFoundError(
        absl::StrCat(dir, ": neither model.safetensors nor model.safetensors.index.json"));
  }

  std::map<std::string, size_t> shard_index;
  auto open_shard = [&](const std::string& name) -> absl::StatusOr<size_t> {
    auto it = shard_index.find(name);
    if (it != shard_index.end()) return it->second;
    ASSIGN_OR_RETURN(auto file, SafetensorsFile::Open((root / name).string()));
    ckpt->files_.push_back(std::move(file));
    shard_index[name] = ckpt->files_.size() - 1;
    return ckpt->files_.size() - 1;
  };

  if (weight_map.empty()) {
    ASSIGN_OR_RETURN(size_t f, open_shard("model.safetensors"));
    for (const auto& e : ckpt->files_[f]->header().tensors) ckpt->tensors_[e.name] = {f, &e};
  } else {
    for (const auto& [tensor, shard] : weight_map) {
      ASSIGN_OR_RETURN(size_t f, open_shard(shard));
      const SafetensorsEntry* e = ckpt->files_[f]->Find(tensor);
      if (e == nullptr) {
        return absl::NotFoundError(absl::StrCat(index_path.string(), " maps tensor '", tensor,
                                                "' to ", ckpt->files_[f]->path(),
                                                ", which does not contain it"));
      }
      ckpt->tensors_[tensor] = {f, e};
    }
  }
  return ckpt;
}

bool Checkpoint::Has(absl::string_view name) const { return tensors_.find(name) != tensors_.end(); }

std::string Checkpoint::FileOf(absl::string_view name) const {
  auto it = tensors_.find(name);
  return it == tensors_.end() ? std::string() : files_[it->second.first]->path();
}

absl::Status Checkpoint::ReadQuantization(const std::string& config_path) {
  const auto q = config_.find("quantization_config");
  if (q == config_.end() || q->is_null()) return absl::OkStatus();
  const auto method = q->is_object() ? q->find("quant_method") : q->end();
  if (method == q->end() || !method->is_string()) {
    return absl::InvalidArgumentError(absl::StrCat(
        config_path, ": quantization_config must be an object with a quant_method string"));
  }
  quant_method_ = method->get<std::string>();
  const auto block = q->find("weight_block_size");
  if (quant_method_ != "fp8" || block == q->end() || block->is_null()) return absl::OkStatus();
  if (!block->is_array() || block->size() != 2 || !(*block)[0].is_number_integer() ||
      !(*block)[1].is_number_integer() || (*block)[0].get<int64_t>() <= 0 ||
      (*block)[1].get<int64_t>() <= 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        config_path, ": quantization_config.weight_block_size must be two positive integers, got ",
        block->dump()));
  }
  fp8_block_[0] = (*block)[0].get<int64_t>();
  fp8_block_[1] = (*block)[1].get<int64_t>();
  return absl::OkStatus();
}

absl::StatusOr<Tensor> Checkpoint::Get(absl::string_view name) const {
  auto it = tensors_.find(name);
  if (it == tensors_.end()) {
    std::string hint;
    if (!quant_method_.empty() && quant_method_ != "fp8" && quant_method_ != "mxfp4") {
      hint =
          absl::StrCat(" (config.json declares quantization_config.quant_method '", quant_method_,
                       "'; MoE Mesh reads F32/BF16/F16, block-scaled fp8 and mxfp4 checkpoints)");
    }
    return absl::NotFoundError(absl::StrCat(dir_, ": checkpoint has no tensor '", name, "'", hint));
  }
  return files_[it->second.first]->View(*it->second.second);
}

absl::StatusOr<Tensor> Checkpoint::Get(absl::string_view name,
                                       const std::vector<int64_t>& shape) const {
  ASSIGN_OR_RETURN(Tensor t, Get(name));
  if (t.shape() != shape) {
    return absl::InvalidArgumentError(absl::StrCat(FileOf(name), ": tensor '", name, "' has shape ",
                                                   ShapeString(t.shape()), ", expected ",
                                                   ShapeString(shape)));
  }
  return t;
}

absl::StatusOr<Tensor> Checkpoint::GetF32(absl::string_view name,
                                          const std::vector<int64_t>& shape) const {
  ASSIGN_OR_RETURN(Tensor t, Get(name, shape));  // the file's shape, before anything is allocated
  Tensor out = Tensor::Empty(DType::kF32, shape);
  RETURN_IF_ERROR(ConvertInto(name, t, out.mutable_data<float>()));
  return out;
}

absl::Status Checkpoint::ReadF32(absl::string_view name, const std::vector<int64_t>& shape,
                                 float* dst) const {
  ASSIGN_OR_RETURN(Tensor t, Get(name, shape));
  return ConvertInto(name, t, dst);
}

absl::Status Checkpoint::ConvertInto(absl::string_view name, const Tensor& t, float* dst) const {
  if (t.dtype() == DType::kF8E4M3) return DequantizeFp8(name, t, dst);
  if (!IsFloatingActivation(t.dtype())) {
    return WrongDType(name, t.dtype(), "F32, BF16, F16 or block-scaled F8_E4M3");
  }
  ConvertToF32(t.dtype(), t.raw(), static_cast<size_t>(t.numel()), dst);
  return absl::OkStatus();
}

absl::Status Checkpoint::WrongDType(absl::string_view name, DType dtype,
                                    absl::string_view expected) const {
  return absl::InvalidArgumentError(absl::StrCat(FileOf(name), ": tensor '", name, "' has dtype ",
                                                 DTypeName(dtype), ", expected ", expected));
}

absl::StatusOr<Tensor> Checkpoint::GetSliceF32(absl::string_view name,
                                               const std::vector<int64_t>& shape,
                                               int64_t index) const {
  ASSIGN_OR_RETURN(Tensor t, Get(name, shape));
  if (!IsFloatingActivation(t.dtype())) return WrongDType(name, t.dtype(), "F32, BF16 or F16");
  if (shape.empty() || index < 0 || index >= shape[0]) {
    return absl::InvalidArgumentError(
        absl::StrCat("tensor '", name, "': entry ", index, " of ", ShapeString(shape)));
  }
  return t.Slice(index).ToF32();
}

absl::Status Checkpoint::DequantizeFp8(absl::string_view name, const Tensor& weight,
                                       float* dst) const {
  const std::string scale_name = absl::StrCat(name, "_scale_inv");
  if (weight.shape().size() != 2) {
    return absl::InvalidArgumentError(absl::StrCat(FileOf(name), ": F8_E4M3 tensor '", name,
                                                   "' has shape ", ShapeString(weight.shape()),
                                                   "; block-scaled FP8 weights are 2-D"));
  }
  if (!Has(scale_name)) {
    return absl::InvalidArgumentError(absl::StrCat(FileOf(name), ": F8_E4M3 tensor '", name,
                                                   "' has no block scales '", scale_name, "'"));
  }
  const int64_t rows = weight.shape()[0], cols = weight.shape()[1];
  const std::vector<int64_t> grid = {(rows + fp8_block_[0] - 1) / fp8_block_[0],
                                     (cols + fp8_block_[1] - 1) / fp8_block_[1]};
  auto scale = Get(scale_name, grid);
  if (!scale.ok()) {
    return absl::InvalidArgumentError(absl::StrCat(scale.status().message(), " (", fp8_block_[0],
                                                   "x", fp8_block_[1], " blocks of '", name, "' ",
                                                   ShapeString(weight.shape()), ")"));
  }
  if (!IsFloatingActivation(scale->dtype())) {
    return WrongDType(scale_name, scale->dtype(), "F32, BF16 or F16");
  }
  ASSIGN_OR_RETURN(Tensor scale_f32, scale->ToF32());
  DequantizeBlockFp8(static_cast<const uint8_t*>(weight.raw()), rows, cols, scale_f32.data<float>(),
                     fp8_block_[0], fp8_block_[1], dst);
  return absl::OkStatus();
}

absl::StatusOr<Tensor> Checkpoint::GetMxfp4(absl::string_view stem, int64_t index,
                                            const std::vector<int64_t>& shape) const {
  const std::string blocks_name = absl::StrCat(stem, "_blocks");
  const std::string scales_name = absl::StrCat(stem, "_scales");
  if (shape.size() != 3 || index < 0 || index >= shape[0]) {
    return absl::InvalidArgumentError(
        absl::StrCat("MXFP4 '", stem, "': entry ", index, " of ", ShapeString(shape)));
  }
  const int64_t rows = shape[1], cols = shape[2];
  if (cols % 32 != 0) {
    return absl::InvalidArgumentError(absl::StrCat(FileOf(blocks_name), ": MXFP4 tensor '",
                                                   blocks_name, "' would unpack to ", cols,
                                                   " columns, which is not a multiple of 32"));
  }
  ASSIGN_OR_RETURN(Tensor blocks, Get(blocks_name, {shape[0], rows, cols / 32, 16}));
  ASSIGN_OR_RETURN(Tensor scales, Get(scales_name, {shape[0], rows, cols / 32}));
  for (const auto& [t, n] : {std::pair{&blocks, &blocks_name}, std::pair{&scales, &scales_name}}) {
    if (t->dtype() != DType::kU8) return WrongDType(*n, t->dtype(), "U8");
  }
  const Tensor b = blocks.Slice(index), s = scales.Slice(index);
  Tensor out = Tensor::Empty(DType::kF32, {rows, cols});
  DequantizeMxfp4(static_cast<const uint8_t*>(b.raw()), static_cast<const uint8_t*>(s.raw()), rows,
                  cols / 32, out.mutable_data<float>());
  return out;
}

std::vector<std::string> Checkpoint::TensorNames() const {
  std::vector<std::string> names;
  for (const auto& [name, _] : tensors_) names.push_back(name);
  return names;
}

}  // namespace moemesh
