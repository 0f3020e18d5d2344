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

int64_t MoeLayer::ForwardF32(const float* x, int64_t T, float* out, int32_t* topk_ids,
                             float* topk_weights) {
  std::lock_guard<std::mutex> lock(mu_);
  const int64_t H = config_.hidden_size, E = config_.num_experts, k = config_.top_k;

  // Router logits in float32, as HF computes them: x·Wgᵀ (+ bias).
  float* logits = Sized(logits_, T * E);
  if (gate_.bias.raw() != nullptr) {
    for (int64_t t = 0; t < T; ++t) std::copy_n(gate_.bias.data<float>(), E, logits + t * E);
  }
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, T, E, H, 1.0f, x, H,
              gate_.weight.data<float>(), H, gate_.bias.raw() ? 1.0f : 0.0f, logits, E);
  const bool expert_choice = options_.mode == RoutingMode::kExpertChoice;
  float* scores = expert_choice ? Sized(scores_, T * E) : nullptr;
  RouteTopK(config_.routing, logits, T,
            gate_.correction_bias.raw() ? gate_.correction_bias.data<float>() : nullptr,
            topk_ids, topk_weights, scores);

  if (!expert_choice) {
    const int64_t capacity =
        options_.capacity_factor > 0
            ? ExpertCapacity(options_.capacity_factor, T, static_cast<int>(k), static_cast<int>(E))
            : -1;
    BuildTokenChoicePlan(topk_ids, topk_weights, T, static_cast<int>(k), static_cast<int>(E),
                         capacity, &plan_);
  } else {
    const double cf = options_.capacity_factor > 0 ? options_.capacity_factor : 1.0;
    const int64_t capacity = ExpertCapacity(cf, T, static_cast<int>(k), static_cast<int>(E));
    BuildExpertChoicePlan(scores, T, static_cast<int>(E), capacity, &plan_);
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

  const int64_t rows = plan_.num_rows();
  float* gx = Sized(grouped_x_, rows * H);
  float* gy = Sized(grouped_y_, rows * H);
  GatherRows(x, H, plan_, 0, rows, gx);
  int64_t max_rows = 0;
  for (int64_t e = 0; e < E; ++e) max_rows = std::max(max_rows, plan_.rows_of(static_cast<int>(e)));
  int64_t scratch_floats = ExpertFfnScratch(experts_[0].View(config_), max_rows);
  if (shared_) scratch_floats = std::max(scratch_floats, ExpertFfnScratch(shared_->ffn.View(config_), T));
  float* scratch = Sized(scratch_, scratch_floats);
  for (int64_t e = 0; e < E; ++e) {
    const int64_t n = plan_.rows_of(static_cast<int>(e));
    if (n == 0) continue;
    const int64_t off = plan_.expert_offsets[e];
    ExpertFfn(experts_[e].View(config_), gx + off * H, n, scratch, gy + off * H);
  }
  CombineRows(gy, H, plan_, 0, T, out);

  if (shared_) {
    float* sy = Sized(shared_y_, T * H);
    ExpertFfn(shared_->ffn.View(config_), x, T, scratch, sy);
    if (shared_->gate.raw() != nullptr) {
      // Qwen2-MoE: out += sigmoid(x·w_sgᵀ) · shared(x)
      const float* wg = shared_->gate.data<float>();
      for (int64_t t = 0; t < T; ++t) {
        const float z = cblas_sdot(static_cast<int>(H), x + t * H, 1, wg, 1);
        const float g = 1.0f / (1.0f + std::exp(-z));
        for (int64_t h = 0; h < H; ++h) out[t * H + h] += g * sy[t * H + h];
      }
    } else {
      for (int64_t i = 0; i < T * H; ++i) out[i] += sy[i];
    }
  }
  return plan_.dropped;
}

}  // namespace moemesh
