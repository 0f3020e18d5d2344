#include "services/moe_layer.h"

#include <cblas.h>

#include <algorithm>
#include <cmath>

#include "absl/strings/str_cat.h"
#include "kernels/cpu/expert_ffn.h"
#include "kernels/cpu/routing.h"
#include "services/status_macros.h"

namespace moemesh {
namespace {

template <typename T>
T* Sized(std::vector<T>& v, int64_t n) {
  if (static_cast<int64_t>(v.size()) < n) v.resize(n);
  return v.data();
}

}  // namespace

absl::Status MoeLayerOptions::Validate() const {
  if (!(capacity_factor >= 0.0) || !std::isfinite(capacity_factor)) {
    return absl::InvalidArgumentError("capacity_factor must be a finite number >= 0");
  }
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<MoeLayer>> MoeLayer::Create(const Checkpoint& ckpt,
                                                           const MoeModelConfig& config,
                                                           int64_t layer,
                                                           MoeLayerOptions options) {
  RETURN_IF_ERROR(options.Validate());
  RETURN_IF_ERROR(config.CheckMoeLayer(layer));
  auto l = std::unique_ptr<MoeLayer>(new MoeLayer(config, layer, options));
  l->pool_ = options.pool != nullptr ? options.pool : &ThreadPool::Default();
  // Parallelism comes from the pool; BLAS calls inside its tasks run single-threaded.
  SetBlasThreads(1);
  ASSIGN_OR_RETURN(l->gate_, LoadGate(ckpt, config, layer));
  l->experts_.reserve(config.num_experts);
  for (int64_t e = 0; e < config.num_experts; ++e) {
    ASSIGN_OR_RETURN(ExpertWeights w, LoadExpert(ckpt, config, layer, e));
    l->experts_.push_back(std::move(w));
  }
  ASSIGN_OR_RETURN(l->shared_, LoadSharedExperts(ckpt, config, layer));
  return l;
}

int64_t MoeLayer::weight_bytes() const {
  int64_t b = static_cast<int64_t>(gate_.weight.nbytes());
  for (const auto& e : experts_) b += e.bytes();
  if (shared_) b += shared_->ffn.bytes() + static_cast<int64_t>(shared_->gate.nbytes());
  return b;
}

absl::StatusOr<MoeLayerOutput> MoeLayer::Forward(const Tensor& hidden) {
  const int64_t H = config_.hidden_size, k = config_.top_k;
  if (hidden.rank() != 2 || hidden.dim(1) != H) {
    return absl::InvalidArgumentError(absl::StrCat("hidden_states has shape ",
                                                   ShapeString(hidden.shape()), ", expected [T, ",
                                                   H, "]"));
  }
  if (!IsFloatingActivation(hidden.dtype())) {
    return absl::InvalidArgumentError(absl::StrCat("hidden_states has dtype ",
                                                   DTypeName(hidden.dtype()),
                                                   ", expected F32, BF16 or F16"));
  }
  const int64_t T = hidden.dim(0);
  if (T == 0) return absl::InvalidArgumentError("hidden_states has no tokens (T = 0)");
  Tensor x = hidden;
  if (hidden.dtype() != DType::kF32) {
    ASSIGN_OR_RETURN(x, hidden.ToF32());
  }
  MoeLayerOutput out;
  Tensor y = Tensor::Empty(DType::kF32, {T, H});
  out.topk_ids = Tensor::Empty(DType::kI32, {T, k});
  out.topk_weights = Tensor::Empty(DType::kF32, {T, k});
  out.dropped = ForwardF32(x.data<float>(), T, y.mutable_data<float>(),
                           out.topk_ids.mutable_data<int32_t>(),
                           out.topk_weights.mutable_data<float>());
  if (hidden.dtype() == DType::kF32) {
    out.output = std::move(y);
  } else {
    ASSIGN_OR_RETURN(out.output, y.FromF32(hidden.dtype()));
  }
  return out;
}

namespace {

// Task sizes. Fixed (not derived from the thread count) so results never depend on
// the machine; small enough that a handful of experts still feeds every core.
// (The FFN's own split is the kernel's canonical one: expert_ffn.h.)
constexpr int64_t kTokensPerTask = 64;     // routing and combine
constexpr int64_t kRowsPerGatherTask = 256;

int64_t Chunks(int64_t n, int64_t per) { return (n + per - 1) / per; }

}  // namespace

MoeLayer::ExpertRows MoeLayer::Rows(int32_t expert, const float* x, int64_t T) {
  const int64_t H = config_.hidden_size;
  if (expert == kShared) {
    ExpertRows r{shared_->ffn.View(config_), x, T, nullptr, nullptr, shared_y_.data()};
    const int64_t R = plan_.num_rows();
    const ExpertFfnWeights& re = experts_[0].View(config_);
    r.gu = gate_up_.data() + GateUpScratch(re, R);
    r.h = hidden_.data() + HiddenScratch(re, R);
    return r;
  }
  const int64_t off = plan_.expert_offsets[expert];
  ExpertRows r{experts_[expert].View(config_), grouped_x_.data() + off * H,
               plan_.rows_of(expert), nullptr, nullptr, grouped_y_.data() + off * H};
  r.gu = gate_up_.data() + GateUpScratch(r.w, off);
  r.h = hidden_.data() + HiddenScratch(r.w, off);
  return r;
}

void MoeLayer::Route(const float* x, int64_t T, int32_t* topk_ids, float* topk_weights) {
  const int64_t H = config_.hidden_size, E = config_.num_experts, k = config_.top_k;
  float* logits = Sized(logits_, T * E);
  const bool expert_choice = options_.mode == RoutingMode::kExpertChoice;
  float* scores = expert_choice ? Sized(scores_, T * E) : nullptr;
  const float* bias = gate_.bias.raw() ? gate_.bias.data<float>() : nullptr;
  const float* correction =
      gate_.correction_bias.raw() ? gate_.correction_bias.data<float>() : nullptr;
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

  if (!expert_choice) {
    const int64_t capacity =
        options_.capacity_factor > 0
            ? ExpertCapacity(options_.capacity_factor, T, static_cast<int>(k), static_cast<int>(E))
            : -1;
    BuildTokenChoicePlan(topk_ids, topk_weights, T, static_cast<int>(k), static_cast<int>(E),
                         capacity, &plan_);
    return;
  }
  const double cf = options_.capacity_factor > 0 ? options_.capacity_factor : 1.0;
  BuildExpertChoicePlan(scores, T, static_cast<int>(E),
                        ExpertCapacity(cf, T, static_cast<int>(k), static_cast<int>(E)), &plan_);
  // Report, per token, the first k experts that took it (expert order).
  for (int64_t t = 0; t < T; ++t) {
    int64_t j = 0;
    for (int64_t r = plan_.token_offsets[t]; r < plan_.token_offsets[t + 1] && j < k; ++r, ++j) {
      const int64_t row = plan_.token_rows[r];
      const auto it = std::upper_bound(plan_.expert_offsets.begin(), plan_.expert_offsets.end(), row);
      topk_ids[t * k + j] = static_cast<int32_t>(it - plan_.expert_offsets.begin() - 1);
      topk_weights[t * k + j] = plan_.token_weights[r];
    }
    for (; j < k; ++j) {
      topk_ids[t * k + j] = -1;
      topk_weights[t * k + j] = 0.0f;
    }
  }
}

void MoeLayer::RunExperts(const float* x, int64_t T) {
  const int64_t H = config_.hidden_size, E = config_.num_experts, R = plan_.num_rows();
  const ExpertFfnWeights routed = experts_[0].View(config_);
  int64_t gu_floats = GateUpScratch(routed, R), h_floats = HiddenScratch(routed, R);
  if (shared_) {
    const ExpertFfnWeights sw = shared_->ffn.View(config_);
    gu_floats += GateUpScratch(sw, T);
    h_floats += HiddenScratch(sw, T);
    Sized(shared_y_, T * H);
  }
  Sized(grouped_x_, R * H);
  Sized(grouped_y_, R * H);
  Sized(gate_up_, gu_floats);
  Sized(hidden_, h_floats);

  pool_->ParallelFor(Chunks(R, kRowsPerGatherTask), [&](int64_t c) {
    const int64_t r0 = c * kRowsPerGatherTask;
    GatherRows(x, H, plan_, r0, std::min(R, r0 + kRowsPerGatherTask), grouped_x_.data() + r0 * H);
  });

  // Gate/up + activation, then down: one task list each over every expert with rows.
  std::vector<int32_t> active;
  for (int64_t e = 0; e < E; ++e) {
    if (plan_.rows_of(static_cast<int>(e)) > 0) active.push_back(static_cast<int32_t>(e));
  }
  if (shared_) active.push_back(kShared);
  tasks_.clear();
  for (int32_t e : active) {
    const ExpertFfnWeights& w = e == kShared ? shared_->ffn.View(config_) : routed;
    for (int64_t i = 0; i < NumGateUpTasks(w); ++i) tasks_.push_back({e, i});
  }
  pool_->ParallelFor(static_cast<int64_t>(tasks_.size()), [&](int64_t i) {
    const ExpertRows r = Rows(tasks_[i].expert, x, T);
    ExpertGateUpTask(r.w, r.x, r.rows, tasks_[i].index, r.gu, r.h);
  });
  tasks_.clear();
  for (int32_t e : active) {
    const ExpertFfnWeights& w = e == kShared ? shared_->ffn.View(config_) : routed;
    for (int64_t i = 0; i < NumDownTasks(w); ++i) tasks_.push_back({e, i});
  }
  pool_->ParallelFor(static_cast<int64_t>(tasks_.size()), [&](int64_t i) {
    const ExpertRows r = Rows(tasks_[i].expert, x, T);
    ExpertDownTask(r.w, r.h, r.rows, tasks_[i].index, r.y);
  });
}

int64_t MoeLayer::ForwardF32(const float* x, int64_t T, float* out, int32_t* topk_ids,
                             float* topk_weights) {
  std::lock_guard<std::mutex> lock(mu_);
  const int64_t H = config_.hidden_size;
  Route(x, T, topk_ids, topk_weights);
  RunExperts(x, T);
  const float* shared_gate =
      shared_ && shared_->gate.raw() != nullptr ? shared_->gate.data<float>() : nullptr;
  pool_->ParallelFor(Chunks(T, kTokensPerTask), [&](int64_t c) {
    const int64_t t0 = c * kTokensPerTask, t1 = std::min(T, t0 + kTokensPerTask);
    CombineRows(grouped_y_.data(), H, plan_, t0, t1, out);
    if (!shared_) return;
    for (int64_t t = t0; t < t1; ++t) {
      float* o = out + t * H;
      const float* sy = shared_y_.data() + t * H;
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
  return plan_.dropped;
}

}  // namespace moemesh
