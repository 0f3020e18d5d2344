// MoeLayer: one MoE block computed in-process, router and every expert local: the
// reference the mesh must reproduce bit for bit.
//
// Forward(x) returns Σ_j w_j · expert_{e_j}(x) (+ the family's shared expert), without the
// residual, as the family's HF block computes it in float32. Steps (docs/architecture.md,
// "MoeLayer data flow"): route (MoeGate), gather, the experts (expert_tasks.h), combine in
// each token's top-k order; every split fixed by the shapes, never by the thread count.
//
// Threads: Forward may be called from several threads; calls on one layer are serialised
// (its workspace, kept between calls, is shared).
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "services/base/mutex.h"
#include "services/base/tensor.h"
#include "services/base/thread_pool.h"
#include "services/model/checkpoint.h"
#include "services/model/model_config.h"
#include "services/model/moe_weights.h"
#include "services/moe/expert_tasks.h"
#include "services/moe/layer_io.h"
#include "services/moe/moe_gate.h"

namespace moemesh {

struct MoeLayerOptions : GateOptions {
  // The mesh's token wire dtype this layer reproduces: with BF16, expert inputs and
  // outputs are rounded through BF16 exactly as they are on the wire, so the mesh's
  // answers equal this layer's bit for bit on either path.
  DType wire_dtype = DType::kF32;

  absl::Status Validate() const;
};

class MoeLayer {
 public:
  static absl::StatusOr<std::unique_ptr<MoeLayer>> Create(const Checkpoint& ckpt,
                                                          const MoeModelConfig& config,
                                                          int64_t layer,
                                                          MoeLayerOptions options = {});

  // hidden_states: [T, H], F32, BF16 or F16, T > 0. Errors name what is wrong.
  absl::StatusOr<MoeLayerOutput> Forward(const Tensor& hidden_states);

  // The float32 core. x: [T, H]; out: [T, H]; topk_ids/topk_weights: [T, k].
  // Returns the number of dropped slots.
  int64_t ForwardF32(const float* x, int64_t num_tokens, float* out, int32_t* topk_ids,
                     float* topk_weights);

  const MoeModelConfig& config() const { return config_; }
  int64_t layer() const { return layer_; }
  int64_t weight_bytes() const;

  // Weights, for benchmarks that time the GEMMs alone.
  const ExpertWeights& expert(int64_t e) const { return experts_[e]; }
  const GateWeights& gate() const { return gate_->weights(); }

 private:
  MoeLayer(const MoeModelConfig& config, int64_t layer, MoeLayerOptions options)
      : config_(config), layer_(layer), options_(options) {}

  // Gather, the experts' FFN (expert_tasks.h), BF16 rounding as the wire does.
  void RunExperts(const float* x) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const MoeModelConfig config_;
  const int64_t layer_;
  const MoeLayerOptions options_;
  std::unique_ptr<MoeGate> gate_;
  std::vector<ExpertWeights> experts_;

  Mutex mu_;  // one call at a time: the workspace below is shared
  MoeGate::Workspace ws_ ABSL_GUARDED_BY(mu_);
  std::vector<float> grouped_x_ ABSL_GUARDED_BY(mu_), grouped_y_ ABSL_GUARDED_BY(mu_);
  std::vector<float> gate_up_ ABSL_GUARDED_BY(mu_), hidden_ ABSL_GUARDED_BY(mu_);
  std::vector<ExpertBatch> batches_ ABSL_GUARDED_BY(mu_);
  std::vector<ExpertTask> tasks_ ABSL_GUARDED_BY(mu_);
};

}  // namespace moemesh
