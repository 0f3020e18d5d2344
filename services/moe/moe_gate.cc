#include "services/moe/moe_gate.h"

#include <cblas.h>

#include <algorithm>
#include <cmath>
#include <cstdio>

#include "absl/strings/str_cat.h"
#include "kernels/cpu/expert_ffn.h"
#include "kernels/cpu/routing.h"
#include "services/base/scratch.h"
#include "services/base/status_macros.h"

namespace moemesh {
namespace {

// Token chunk of routing and combine tasks. Fixed, so results never depend on threads.
constexpr int64_t kTokensPerTask = 64;

int64_t Chunks(int64_t n, int64_t per) { return (n + per - 1) / per; }

}  // namespace

absl::Status GateOptions::Validate() const {
  if (!(capacity_factor >= 0.0) || !std::isfinite(capacity_factor)) {
    return absl::InvalidArgumentError("capacity_factor must be a finite number >= 0");
  }
  if (gpu < -1) return absl::InvalidArgumentError("gpu must be a device number, or -1 for the CPU");
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<MoeGate>> MoeGate::Create(const Checkpoint& ckpt,
                                                         const MoeModelConfig& config,
                                                         int64_t layer, GateOptions options) {
  RETURN_IF_ERROR(options.Validate());
  RETURN_IF_ERROR(config.CheckMoeLayer(layer));
  auto g = std::unique_ptr<MoeGate>(new MoeGate(config, layer, options));
  g->pool_ = options.pool != nullptr ? options.pool : &ThreadPool::Default();
  // Parallelism comes from the pool; BLAS calls inside its tasks run single-threaded.
  SetBlasThreads(1);
  ASSIGN_OR_RETURN(g->gate_, LoadGate(ckpt, config, layer));
  ASSIGN_OR_RETURN(g->shared_, LoadSharedExperts(ckpt, config, layer));
  if (options.gpu >= 0) {
    ASSIGN_OR_RETURN(g->gpu_, GpuGate::Create(config, g->gate_, options.gpu));
  }
  return g;
}

MoeGate::~MoeGate() = default;

int64_t MoeGate::weight_bytes() const {
  int64_t b = static_cast<int64_t>(gate_.weight.nbytes());
  if (shared_) b += shared_->ffn.bytes() + static_cast<int64_t>(shared_->gate.nbytes());
  return b;
}

void MoeGate::Route(const float* x, int64_t T, int32_t* topk_ids, float* topk_weights,
                    Workspace* ws) const {
  const int64_t H = config_.hidden_size, E = config_.num_experts, k = config_.top_k;
  float* logits = Sized(ws->logits, T * E);
  const bool expert_choice = options_.mode == RoutingMode::kExpertChoice;
  float* scores = expert_choice || ws->want_prob_sums ? Sized(ws->scores, T * E) : nullptr;
  const float* bias = gate_.bias.raw() ? gate_.bias.data<float>() : nullptr;
  const float* correction =
      gate_.correction_bias.raw() ? gate_.correction_bias.data<float>() : nullptr;
  bool routed = false;
  if (gpu_ != nullptr && !expert_choice) {
    const absl::Status s = gpu_->Route(x, T, topk_ids, topk_weights, scores);
    routed = s.ok();
    if (!routed && gpu_failures_.fetch_add(1) == 0) {
      std::fprintf(stderr,
                   "layer %lld: routing on the GPU failed, routing on the CPU instead: %s\n",
                   static_cast<long long>(layer_), s.ToString().c_str());
    }
  }
  if (!routed)
    pool_->ParallelFor(Chunks(T, kTokensPerTask), [&](int64_t c) {
      const int64_t t0 = c * kTokensPerTask, n = std::min(kTokensPerTask, T - t0);
      float* lg = logits + t0 * E;
      // Router logits in float32, as HF computes them: x·Wgᵀ (+ bias).
      if (bias != nullptr) {
        for (int64_t t = 0; t < n; ++t) std::copy_n(bias, E, lg + t * E);
      }
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, E, H, 1.0f, x + t0 * H, H,
                  gate_.weight.data<float>(), H, bias ? 1.0f : 0.0f, lg, E);
      RouteTopK(config_.routing, lg, n, correction, topk_ids + t0 * k, topk_weights + t0 * k,
                scores ? scores + t0 * E : nullptr);
    });

  if (ws->want_prob_sums) {
    ws->prob_sums.assign(E, 0.0);
    const bool normalise = config_.routing.scoring == Scoring::kSigmoid;
    for (int64_t t = 0; t < T; ++t) {
      const float* p = scores + t * E;
      double scale = 1.0;
      if (normalise) {
        double sum = 0;
        for (int64_t e = 0; e < E; ++e) sum += p[e];
        scale = sum > 0 ? 1.0 / sum : 0.0;
      }
      for (int64_t e = 0; e < E; ++e) ws->prob_sums[e] += p[e] * scale;
    }
  }

  DispatchPlan& plan = ws->plan;
  if (!expert_choice) {
    const int64_t capacity =
        options_.capacity_factor > 0
            ? ExpertCapacity(options_.capacity_factor, T, static_cast<int>(k), static_cast<int>(E))
            : -1;
    BuildTokenChoicePlan(topk_ids, topk_weights, T, static_cast<int>(k), static_cast<int>(E),
                         capacity, &plan);
    return;
  }
  const double cf = options_.capacity_factor > 0 ? options_.capacity_factor : 1.0;
  BuildExpertChoicePlan(scores, T, static_cast<int>(E),
                        ExpertCapacity(cf, T, static_cast<int>(k), static_cast<int>(E)), &plan);
  for (int64_t t = 0; t < T; ++t) {
    int64_t j = 0;
    for (int64_t r = plan.token_offsets[t]; r < plan.token_offsets[t + 1] && j < k; ++r, ++j) {
      const int64_t row = plan.token_rows[r];
      const auto it = std::upper_bound(plan.expert_offsets.begin(), plan.expert_offsets.end(), row);
      topk_ids[t * k + j] = static_cast<int32_t>(it - plan.expert_offsets.begin() - 1);
      topk_weights[t * k + j] = plan.token_weights[r];
    }
    for (; j < k; ++j) {
      topk_ids[t * k + j] = -1;
      topk_weights[t * k + j] = 0.0f;
    }
  }
}

void MoeGate::RunSharedExpert(const float* x, int64_t T, Workspace* ws) const {
  if (!shared_) return;
  const ExpertFfnWeights w = shared_->ffn.View(config_);
  float* gu = Sized(ws->shared_gu, GateUpScratch(w, T));
  float* h = Sized(ws->shared_h, HiddenScratch(w, T));
  float* y = Sized(ws->shared_y, T * config_.hidden_size);
  pool_->ParallelFor(NumGateUpTasks(w), [&](int64_t i) { ExpertGateUpTask(w, x, T, i, gu, h); });
  pool_->ParallelFor(NumDownTasks(w), [&](int64_t i) { ExpertDownTask(w, h, T, i, y); });
}

void MoeGate::Combine(const float* grouped_y, const float* x, int64_t T, const Workspace& ws,
                      float* out) const {
  const int64_t H = config_.hidden_size;
  const float* shared_gate =
      shared_ && shared_->gate.raw() != nullptr ? shared_->gate.data<float>() : nullptr;
  pool_->ParallelFor(Chunks(T, kTokensPerTask), [&](int64_t c) {
    const int64_t t0 = c * kTokensPerTask, t1 = std::min(T, t0 + kTokensPerTask);
    CombineRows(grouped_y, H, ws.plan, t0, t1, out);
    if (!shared_) return;
    for (int64_t t = t0; t < t1; ++t) {
      float* o = out + t * H;
      const float* sy = ws.shared_y.data() + t * H;
      if (shared_gate != nullptr) {
        // Qwen2-MoE: out += sigmoid(x·w_sgᵀ) · shared(x)
        const float z = cblas_sdot(static_cast<int>(H), x + t * H, 1, shared_gate, 1);
        const float g = 1.0f / (1.0f + std::exp(-z));
        for (int64_t h = 0; h < H; ++h) o[h] += g * sy[h];
      } else {
        for (int64_t h = 0; h < H; ++h) o[h] += sy[h];
      }
    }
  });
}

}  // namespace moemesh
