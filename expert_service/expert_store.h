// ExpertStore: the routed experts one expert service holds, keyed by (MoE layer,
// expert), all from one checkpoint.
//
// Thread safety: every method may be called from any thread at any time. A
// reader/writer mutex guards the map and nothing else: weights are read from the checkpoint
// outside it, and Get hands out shared_ptrs, so a compute never holds the lock,
// concurrent computes never serialise on it, and an Unload while a compute runs is safe
// (the weights live until the compute drops its pointer).
//
// Errors: INVALID_ARGUMENT naming the layer and expert for a pair that is not a routed
// expert of the checkpoint (missing or dense layer, expert out of range); the
// checkpoint's own error, naming file and tensor, for weights that cannot be read;
// NOT_FOUND from Get for a valid pair this store does not hold.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "services/base/mutex.h"
#include "services/model/checkpoint.h"
#include "services/model/model_config.h"
#include "services/model/moe_weights.h"

namespace moemesh {

// (MoE layer, expert): the pair PlacementTable::ExpertsOf lists.
using ExpertKey = std::pair<int64_t, int32_t>;

class ExpertStore {
 public:
  // Opens the checkpoint and parses its config; holds no expert yet.
  static absl::StatusOr<std::unique_ptr<ExpertStore>> Open(const std::string& model_dir);

  // All or nothing: checks every pair, reads the ones not held yet, then publishes them
  // together, so a failed Load leaves the store as it was. Pairs already held are kept
  // as they are (idempotent).
  absl::Status Load(const std::vector<ExpertKey>& experts);
  // Drops the pairs; pairs not held are ignored (idempotent). An invalid pair fails
  // the call before anything is dropped.
  absl::Status Unload(const std::vector<ExpertKey>& experts);
  // NOT_FOUND naming layer and expert when not held.
  absl::StatusOr<std::shared_ptr<const ExpertWeights>> Get(int64_t layer, int32_t expert) const;
  // Held pairs in (layer, expert) order.
  std::vector<ExpertKey> List() const;
  int64_t size() const;
  // Float32 weight bytes held.
  int64_t weight_bytes() const;

  const MoeModelConfig& config() const { return config_; }

 private:
  ExpertStore() = default;
  // INVALID_ARGUMENT unless `key` is a routed expert of config_.
  absl::Status Check(const ExpertKey& key) const;

  std::unique_ptr<Checkpoint> ckpt_;
  MoeModelConfig config_;

  mutable SharedMutex mu_;
  std::map<ExpertKey, std::shared_ptr<const ExpertWeights>> experts_ ABSL_GUARDED_BY(mu_);
  int64_t weight_bytes_ ABSL_GUARDED_BY(mu_) = 0;
};

}  // namespace moemesh
