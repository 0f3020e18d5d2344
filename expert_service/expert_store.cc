#include "expert_service/expert_store.h"

#include <mutex>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "services/status_macros.h"

namespace moemesh {

absl::Status ExpertStore::Load(const std::vector<ExpertKey>& keys) {
  for (const auto& [layer, expert] : keys) {
    {
      std::shared_lock<std::shared_mutex> lock(mu_);
      if (experts_.count({layer, expert})) continue;
    }
    // Load outside the lock: reading weights is slow and must not stall computes.
    ASSIGN_OR_RETURN(ExpertWeights w, LoadExpert(ckpt_, config_, layer, expert));
    auto ptr = std::make_shared<const ExpertWeights>(std::move(w));
    std::unique_lock<std::shared_mutex> lock(mu_);
    experts_.emplace(ExpertKey{layer, expert}, std::move(ptr));
  }
  return absl::OkStatus();
}

void ExpertStore::Unload(const std::vector<ExpertKey>& keys) {
  std::unique_lock<std::shared_mutex> lock(mu_);
  for (const auto& k : keys) experts_.erase(k);
}

absl::StatusOr<std::shared_ptr<const ExpertWeights>> ExpertStore::Get(int64_t layer,
                                                                      int32_t expert) const {
  std::shared_lock<std::shared_mutex> lock(mu_);
  auto it = experts_.find({layer, expert});
  if (it == experts_.end()) {
    return absl::NotFoundError(absl::StrCat("layer ", layer, " expert ", expert, " is not held by this service"));
  }
  return it->second;
}

std::vector<ExpertKey> ExpertStore::List() const {
  std::shared_lock<std::shared_mutex> lock(mu_);
  std::vector<ExpertKey> out;
  for (const auto& [k, _] : experts_) out.push_back(k);
  return out;
}

int64_t ExpertStore::weight_bytes() const {
  std::shared_lock<std::shared_mutex> lock(mu_);
  int64_t b = 0;
  for (const auto& [_, w] : experts_) b += w->bytes();
  return b;
}

namespace {

absl::Status ParseRanges(absl::string_view text, int64_t num_experts, std::vector<int32_t>* out) {
  for (absl::string_view part : absl::StrSplit(text, ',', absl::SkipEmpty())) {
    std::vector<absl::string_view> ends = absl::StrSplit(part, '-');
    int64_t lo, hi;
    if (ends.size() > 2 || !absl::SimpleAtoi(ends[0], &lo) ||
        !absl::SimpleAtoi(ends.back(), &hi) || lo < 0 || hi < lo || hi >= num_experts) {
      return absl::InvalidArgumentError(absl::StrCat("expert range '", std::string(part),
                                                     "' is not within [0, ", num_experts, ")"));
    }
    for (int64_t e = lo; e <= hi; ++e) out->push_back(static_cast<int32_t>(e));
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<std::vector<ExpertKey>> ParseExpertSpec(absl::string_view spec,
                                                       const MoeModelConfig& config) {
  std::vector<ExpertKey> keys;
  if (spec == "none") return keys;
  const std::vector<int64_t> layers = config.MoeLayers();
  if (spec == "all") {
    for (int64_t l : layers) {
      for (int32_t e = 0; e < config.num_experts; ++e) keys.push_back({l, e});
    }
    return keys;
  }
  if (spec.find(':') == absl::string_view::npos) {
    std::vector<int32_t> experts;
    RETURN_IF_ERROR(ParseRanges(spec, config.num_experts, &experts));
    for (int64_t l : layers) {
      for (int32_t e : experts) keys.push_back({l, e});
    }
    return keys;
  }
  for (absl::string_view part : absl::StrSplit(spec, ';', absl::SkipEmpty())) {
    const size_t colon = part.find(':');
    int64_t layer;
    if (colon == absl::string_view::npos || !absl::SimpleAtoi(part.substr(0, colon), &layer)) {
      return absl::InvalidArgumentError(absl::StrCat("expert spec part '", std::string(part),
                                                     "' is not LAYER:RANGES"));
    }
    RETURN_IF_ERROR(config.CheckMoeLayer(layer));
    std::vector<int32_t> experts;
    RETURN_IF_ERROR(ParseRanges(part.substr(colon + 1), config.num_experts, &experts));
    for (int32_t e : experts) keys.push_back({layer, e});
  }
  return keys;
}

}  // namespace moemesh
