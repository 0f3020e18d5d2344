// MoeGate: the router's half of an MoE layer — gate weights and routing rule, the
// dispatch plan, the shared expert, and the combine. MoeLayer (every expert local) and
// the router service (experts in other processes) both use it; sharing this code and the
// kernels' canonical task split is what makes their outputs bit-identical.
//
// Routing is computed per chunk of kRouteTokens tokens (logits GEMM + RouteTopK), the
// combine per chunk of tokens on the pool; every split is fixed by shapes, so results
// never depend on the thread count. Const methods are thread-safe: all mutable state is
// in the caller's Workspace.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <optional>
#include <vector>

#include "absl/status/statusor.h"
#include "kernels/cpu/dispatch.h"
#include "services/base/thread_pool.h"
#include "services/cuda/gpu_gate.h"
#include "services/model/checkpoint.h"
#include "services/model/model_config.h"
#include "services/model/moe_weights.h"

namespace moemesh {

enum class RoutingMode : uint8_t {
  kTokenChoice,   // each token picks its top-k experts (every family's rule)
  kExpertChoice,  // each expert picks its top-C tokens by router probability
};

struct GateOptions {
  // Token choice: 0 = dropless; > 0 admits ceil(cf·T·k/E) slots per expert in token
  // order and drops the rest. Expert choice: C = cf·T·k/E (0 means 1.0).
  double capacity_factor = 0.0;
  RoutingMode mode = RoutingMode::kTokenChoice;
  // Where the work runs; nullptr = ThreadPool::Default(). Not owned.
  ThreadPool* pool = nullptr;
  // >= 0: token-choice routing (logits and top-k) on that CUDA device (services/gpu_gate:
  // the CPU routing's contract, logits summed in another order, so within float rounding
  // of the CPU's, not bit-identical); -1: on the CPU. A GPU failure during a call falls
  // back to the CPU for that call.
  int gpu = -1;

  absl::Status Validate() const;
};

class MoeGate {
 public:
  // Per-call state, owned by the caller and reused across calls.
  struct Workspace {
    DispatchPlan plan;
    std::vector<float> logits, scores, shared_gu, shared_h, shared_y;
    // Set by the caller: Route also fills prob_sums [E] with each expert's router
    // probability summed over the tokens (load statistics; sigmoid scores are
    // normalised per token to sum to 1 first, as DeepSeek-V3's balance loss does).
    bool want_prob_sums = false;
    std::vector<double> prob_sums;
  };

  ~MoeGate();
  static absl::StatusOr<std::unique_ptr<MoeGate>> Create(const Checkpoint& ckpt,
                                                         const MoeModelConfig& config,
                                                         int64_t layer, GateOptions options = {});

  // Routes x [T, H] (float32): topk_ids/topk_weights [T, k] and ws->plan. Expert choice
  // reports per token the first k experts that took it (expert order), padded with -1/0.
  void Route(const float* x, int64_t num_tokens, int32_t* topk_ids, float* topk_weights,
             Workspace* ws) const;
  // ws->shared_y [T, H] = shared expert(x); nothing when the family has none.
  void RunSharedExpert(const float* x, int64_t num_tokens, Workspace* ws) const;
  // out [T, H] = Σ over each token's plan rows (fixed order) of w · grouped_y[row]
  //              (+ the shared expert, sigmoid-gated for Qwen2-MoE).
  void Combine(const float* grouped_y, const float* x, int64_t num_tokens, const Workspace& ws,
               float* out) const;

  const MoeModelConfig& config() const { return config_; }
  int64_t layer() const { return layer_; }
  bool has_shared_expert() const { return shared_.has_value(); }
  const GateWeights& weights() const { return gate_; }
  ThreadPool& pool() const { return *pool_; }
  int64_t weight_bytes() const;
  // Calls routed on the CPU because the GPU (options.gpu) failed them, since Create.
  int64_t gpu_fallbacks() const { return gpu_failures_.load(std::memory_order_relaxed); }

 private:
  MoeGate(const MoeModelConfig& config, int64_t layer, GateOptions options)
      : config_(config), layer_(layer), options_(options) {}

  const MoeModelConfig config_;
  const int64_t layer_;
  const GateOptions options_;
  ThreadPool* pool_ = nullptr;
  GateWeights gate_;
  std::optional<SharedExpertWeights> shared_;
  std::unique_ptr<GpuGate> gpu_;  // options_.gpu >= 0
  mutable std::atomic<int64_t> gpu_failures_{0};
};

}  // namespace moemesh
