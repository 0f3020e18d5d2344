// ExpertStore: the experts this service holds, for every MoE layer of one checkpoint.
//
// A shared_mutex guards only the map; Get hands out shared_ptrs, so computing never
// holds the lock, concurrent callers never serialise, and an Unload while a compute is
// in flight is safe (the weights live until the last user lets go).
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <shared_mutex>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "services/checkpoint.h"
#include "services/model_config.h"
#include "services/moe_weights.h"

namespace moemesh {

using ExpertKey = std::pair<int64_t, int32_t>;  // (layer, expert)

class ExpertStore {
 public:
  ExpertStore(const Checkpoint& ckpt, const MoeModelConfig& config) : ckpt_(ckpt), config_(config) {}

  // Loads the missing ones; the first bad key fails the call (nothing after it loads).
  absl::Status Load(const std::vector<ExpertKey>& keys);
  void Unload(const std::vector<ExpertKey>& keys);
  // NOT_FOUND naming layer and expert when not held.
  absl::StatusOr<std::shared_ptr<const ExpertWeights>> Get(int64_t layer, int32_t expert) const;
  std::vector<ExpertKey> List() const;
  int64_t weight_bytes() const;
  const MoeModelConfig& config() const { return config_; }

 private:
  const Checkpoint& ckpt_;
  const MoeModelConfig& config_;
  mutable std::shared_mutex mu_;
  std::map<ExpertKey, std::shared_ptr<const ExpertWeights>> experts_;  // guarded by mu_
};

// Parses an --experts spec against a config:
//   "all"            every expert of every MoE layer
//   "none"           nothing
//   "0-3,6"          those experts in every MoE layer
//   "1:0-3;2:4,7"    per layer
absl::StatusOr<std::vector<ExpertKey>> ParseExpertSpec(absl::string_view spec,
                                                       const MoeModelConfig& config);

}  // namespace moemesh
