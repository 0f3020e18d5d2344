// MoeLayer: one MoE block computed in-process — router and every expert local. It is
// the reference the mesh must reproduce and the CPU compute path expert services reuse.
//
// Forward(x) returns Σ_j w_j · expert_{e_j}(x) (+ the family's shared expert), without
// the residual, exactly as the family's HF block computes it in float32.
//
// Steps: router logits (GEMM) + RouteTopK per token chunk -> DispatchPlan (tokens
// grouped per expert) -> gather -> gate/up+activation tasks -> down tasks (the
// kernel's canonical split, expert_ffn.h, for every expert with rows) -> combine in each token's top-k order
// + shared expert. Each step is a ThreadPool ParallelFor with single-threaded BLAS
// inside, so both small batches (many experts, few rows: weights streamed by every
// core at once) and large ones use every core. The split is fixed by the shapes, never
// by the thread count, so results are bit-identical on any machine.
// Workspaces are kept between calls: a warm layer allocates only its output tensors.
//
// Thread safety: Forward may be called from several threads; calls on one layer are
// serialised (its workspace is shared).
#pragma once

#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "kernels/cpu/thread_pool.h"
#include "services/moe/moe_gate.h"
#include "services/model/checkpoint.h"
#include "services/model/model_config.h"
#include "services/model/moe_weights.h"
#include "services/base/tensor.h"

namespace moemesh {

struct MoeLayerOptions : GateOptions {
  // The mesh's token wire dtype this layer reproduces: with BF16, expert inputs and
  // outputs are rounded through BF16 exactly as they are on the wire, so the mesh's
  // answers equal this layer's bit for bit on either path.
  DType wire_dtype = DType::kF32;

  absl::Status Validate() const;
};

struct MoeLayerOutput {
  Tensor output;        // [T, H], the input's dtype
  Tensor topk_ids;      // I32 [T, k]; expert choice: the first k experts that took the
                        // token, in expert order, padded with -1
  Tensor topk_weights;  // F32 [T, k]; 0 where topk_ids is -1
  int64_t dropped = 0;  // (token, choice) slots dropped by the capacity limit
};

// Checks hidden_states for a layer of width `hidden_size` — [T, hidden_size], T > 0, F32,
// BF16 or F16 — and returns it as F32 (the same tensor when it already is). The error
// (INVALID_ARGUMENT) names what is wrong. MoeLayer and the router both start here.
absl::StatusOr<Tensor> HiddenStatesAsF32(const Tensor& hidden, int64_t hidden_size);

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

  // One unit of FFN work: an expert and the index of one of the kernel's canonical tasks.
  struct FfnTask {
    int32_t expert;
    int64_t index;
  };
  void RunExperts(const float* x);

  const MoeModelConfig config_;
  const int64_t layer_;
  const MoeLayerOptions options_;
  std::unique_ptr<MoeGate> gate_;
  std::vector<ExpertWeights> experts_;

  std::mutex mu_;  // guards the workspace below
  MoeGate::Workspace ws_;
  std::vector<float> grouped_x_, grouped_y_, gate_up_, hidden_;
  std::vector<FfnTask> tasks_;
};

}  // namespace moemesh
