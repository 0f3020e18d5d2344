#include "expert_service/expert_store.h"

#include "absl/strings/str_cat.h"
#include "services/base/mutex.h"
#include "services/base/status_macros.h"

namespace moemesh {

absl::StatusOr<std::unique_ptr<ExpertStore>> ExpertStore::Open(const std::string& model_dir) {
  auto store = std::unique_ptr<ExpertStore>(new ExpertStore());
  ASSIGN_OR_RETURN(store->ckpt_, Checkpoint::Open(model_dir));
  ASSIGN_OR_RETURN(store->config_, ParseMoeModelConfig(store->ckpt_->config()));
  return store;
}

absl::Status ExpertStore::Check(const ExpertKey& key) const {
  const auto& [layer, expert] = key;
  const absl::Status layer_ok = config_.CheckMoeLayer(layer);
  if (!layer_ok.ok()) {
    return absl::InvalidArgumentError(
        absl::StrCat("layer ", layer, " expert ", expert, ": ", std::string(layer_ok.message())));
  }
  if (expert < 0 || expert >= config_.num_experts) {
    return absl::InvalidArgumentError(absl::StrCat("layer ", layer, " expert ", expert,
                                                   ": expert out of range [0, ",
                                                   config_.num_experts, ")"));
  }
  return absl::OkStatus();
}

absl::Status ExpertStore::Load(const std::vector<ExpertKey>& experts) {
  for (const ExpertKey& key : experts) RETURN_IF_ERROR(Check(key));
  std::map<ExpertKey, std::shared_ptr<const ExpertWeights>> fresh;
  {
    ReaderMutexLock lock(&mu_);
    for (const ExpertKey& key : experts) {
      if (!experts_.count(key)) fresh[key] = nullptr;
    }
  }
  // Read outside the lock: it is slow, and computes must not wait for it.
  for (auto& [key, weights] : fresh) {
    ASSIGN_OR_RETURN(ExpertWeights w, LoadExpert(*ckpt_, config_, key.first, key.second));
    weights = std::make_shared<const ExpertWeights>(std::move(w));
  }
  MutexLock lock(&mu_);
  for (auto& [key, weights] : fresh) {
    // A concurrent Load may have published the same pair meanwhile; keep its copy.
    const int64_t bytes = weights->bytes();
    if (experts_.emplace(key, std::move(weights)).second) weight_bytes_ += bytes;
  }
  return absl::OkStatus();
}

absl::Status ExpertStore::Unload(const std::vector<ExpertKey>& experts) {
  for (const ExpertKey& key : experts) RETURN_IF_ERROR(Check(key));
  MutexLock lock(&mu_);
  for (const ExpertKey& key : experts) {
    auto it = experts_.find(key);
    if (it == experts_.end()) continue;
    weight_bytes_ -= it->second->bytes();
    experts_.erase(it);
  }
  return absl::OkStatus();
}

absl::StatusOr<std::shared_ptr<const ExpertWeights>> ExpertStore::Get(int64_t layer,
                                                                      int32_t expert) const {
  ReaderMutexLock lock(&mu_);
  auto it = experts_.find({layer, expert});
  if (it == experts_.end()) {
    return absl::NotFoundError(
        absl::StrCat("layer ", layer, " expert ", expert, " is not held by this expert service"));
  }
  return it->second;
}

std::vector<ExpertKey> ExpertStore::List() const {
  ReaderMutexLock lock(&mu_);
  std::vector<ExpertKey> keys;
  keys.reserve(experts_.size());
  for (const auto& [key, weights] : experts_) keys.push_back(key);
  return keys;
}

int64_t ExpertStore::size() const {
  ReaderMutexLock lock(&mu_);
  return static_cast<int64_t>(experts_.size());
}

int64_t ExpertStore::weight_bytes() const {
  ReaderMutexLock lock(&mu_);
  return weight_bytes_;
}

}  // namespace moemesh
