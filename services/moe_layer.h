// MoeLayer: one MoE block computed in-process — router and every expert local. It is
// the reference the mesh must reproduce and the CPU compute path expert services reuse.
//
// Forward(x) returns Σ_j w_j · expert_{e_j}(x) (+ the family's shared expert), without
// the residual, exactly as the family's HF block computes it in float32.
//
// Steps: router logits (one GEMM) -> RouteTopK -> DispatchPlan (tokens grouped per
// expert) -> gather -> per-expert ExpertFfn (two GEMMs, fused activation) -> combine in
// each token's top-k order -> + shared expert. Workspaces are kept between calls, so a
// warm layer allocates nothing but its output tensors.
//
// Thread safety: Forward may be called from several threads; calls on one layer are
// serialised (its workspace is shared). Use one MoeLayer per thread for parallelism.
#pragma once

#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "kernels/cpu/dispatch.h"
#include "services/checkpoint.h"
#include "services/model_config.h"
#include "services/moe_weights.h"
#include "services/tensor.h"

namespace moemesh {

enum class RoutingMode : uint8_t {
  kTokenChoice,   // each token picks its top-k experts (every family's rule)
  kExpertChoice,  // each expert picks its top-C tokens by router probability
};

struct MoeLayerOptions {
  // Token choice: 0 = dropless; > 0 admits ceil(cf·T·k/E) slots per expert in token
  // order and drops the rest. Expert choice: C = cf·T·k/E (0 means 1.0).
  double capacity_factor = 0.0;
  RoutingMode mode = RoutingMode::kTokenChoice;

  absl::Status Validate() const;
};

struct MoeLayerOutput {
  Tensor output;        // [T, H], the input's dtype
  Tensor topk_ids;      // I32 [T, k]; expert choice: the first k experts that took the
                        // token, in expert order, padded with -1
  Tensor topk_weights;  // F32 [T, k]; 0 where topk_ids is -1
  int64_t dropped = 0;  // (token, choice) slots dropped by the capacity limit
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

  // The per-expert part alone (gather, expert GEMMs, combine) on a plan built from
  // given routing; exposed so benchmarks can time GEMMs apart from routing.
  const ExpertWeights& expert(int64_t e) const { return experts_[e]; }

 private:
  MoeLayer(const MoeModelConfig& config, int64_t layer, MoeLayerOptions options)
      : config_(config), layer_(layer), options_(options) {}

  const MoeModelConfig config_;
  const int64_t layer_;
  const MoeLayerOptions options_;
  GateWeights gate_;
  std::vector<ExpertWeights> experts_;
  std::optional<SharedExpertWeights> shared_;

  std::mutex mu_;  // guards the workspace below
  DispatchPlan plan_;
  std::vector<float> logits_, scores_, grouped_x_, grouped_y_, scratch_, shared_y_;
};

}  // namespace moemesh
