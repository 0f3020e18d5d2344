#include "services/checkpoint.h"

#include <filesystem>
#include <fstream>
#include <set>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "services/status_macros.h"

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
  if (json.is_discarded()) return absl::InvalidArgumentError(absl::StrCat(path.string(), ": not valid JSON"));
  if (!json.is_object()) return absl::InvalidArgumentError(absl::StrCat(path.string(), ": not a JSON object"));
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

  const fs::path index_path = root / "model.safetensors.index.json";
  const fs::path single_path = root / "model.safetensors";
  std::map<std::string, std::string> weight_map;  // tensor -> shard file name
  if (fs::exists(index_path, ec)) {
    ASSIGN_OR_RETURN(Json index, ReadJson(index_path));
    const auto wm = index.find("weight_map");
    if (wm == index.end() || !wm->is_object()) {
      return absl::InvalidArgumentError(absl::StrCat(index_path.string(), ": missing weight_map object"));
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
                                                       it.key(), "' names an invalid shard '", shard, "'"));
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

absl::StatusOr<Tensor> Checkpoint::Get(absl::string_view name) const {
  auto it = tensors_.find(name);
  if (it == tensors_.end()) {
    return absl::NotFoundError(absl::StrCat(dir_, ": checkpoint has no tensor '", name, "'"));
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
  ASSIGN_OR_RETURN(Tensor t, Get(name, shape));
  if (t.dtype() != DType::kF32 && t.dtype() != DType::kBF16 && t.dtype() != DType::kF16) {
    return absl::InvalidArgumentError(absl::StrCat(FileOf(name), ": tensor '", name, "' has dtype ",
                                                   DTypeName(t.dtype()),
                                                   ", expected F32, BF16 or F16"));
  }
  return t.ToF32();
}

std::vector<std::string> Checkpoint::TensorNames() const {
  std::vector<std::string> names;
  for (const auto& [name, _] : tensors_) names.push_back(name);
  return names;
}

}  // namespace moemesh
