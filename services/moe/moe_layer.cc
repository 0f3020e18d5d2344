#include "services/moe/moe_layer.h"

#include <cblas.h>

#include <algorithm>
#include <cmath>

#include "absl/strings/str_cat.h"
#include "kernels/cpu/expert_ffn.h"
#include "services/base/status_macros.h"

namespace moemesh {

absl::Status MoeLayerOptions::Validate() const {
  RETURN_IF_ERROR(GateOptions::Validate());
  if (wire_dtype != DType::kF32 && wire_dtype != DType::kBF16) {
    return absl::InvalidArgumentError("wire_dtype must be F32 or BF16");
  }
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<MoeLayer>> MoeLayer::Create(const Checkpoint& ckpt,
                                                           const MoeModelConfig& config,
                                                           int64_t layer,
                                                           MoeLayerOptions options) {
  RETURN_IF_ERROR(options.Validate());
  auto l = std::unique_ptr<MoeLayer>(new MoeLayer(config, layer, options));
  ASSIGN_OR_RETURN(l->gate_, MoeGate::Create(ckpt, config, layer, options));
  l->experts_.reserve(config.num_experts);
  for (int64_t e = 0; e < config.num_experts; ++e) {
    ASSIGN_OR_RETURN(ExpertWeights w, LoadExpert(ckpt, config, layer, e));
    l->experts_.push_back(std::move(w));
  }
  return l;
}

int64_t MoeLayer::weight_bytes() const {
  int64_t b = gate_->weight_bytes();
  for (const auto& e : experts_) b += e.bytes();
  return b;
}

absl::StatusOr<Tensor> HiddenStatesAsF32(const Tensor& hidden, int64_t hidden_size) {
  if (hidden.rank() != 2 || hidden.dim(1) != hidden_size) {
    return absl::InvalidArgumentError(absl::StrCat("hidden_states has shape ",
                                                   ShapeString(hidden.shape()), ", expected [T, ",
                                                   hidden_size, "]"));
  }
  if (!IsFloatingActivation(hidden.dtype())) {
    return absl::InvalidArgumentError(absl::StrCat("hidden_states has dtype ",
                                                   DTypeName(hidden.dtype()),
                                                   ", expected F32, BF16 or F16"));
  }
  if (hidden.dim(0) == 0) return absl::InvalidArgumentError("hidden_states has no tokens (T = 0)");
  if (hidden.dtype() == DType::kF32) return hidden;
  return hidden.ToF32();
}

absl::StatusOr<MoeLayerOutput> MoeLayer::Forward(const Tensor& hidden) {
  const int64_t H = config_.hidden_size, k = config_.top_k;
  ASSIGN_OR_RETURN(const Tensor x, HiddenStatesAsF32(hidden, H));
  const int64_t T = x.dim(0);
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

// What the wire does to a row buffer: float32 -> wire dtype -> float32.
void RoundThroughWire(DType wire, float* v, int64_t n) {
  if (wire != DType::kBF16) return;
  for (int64_t i = 0; i < n; ++i) v[i] = Bf16ToF32(F32ToBf16(v[i]));
}

}  // namespace

void MoeLayer::RunExperts(const float* x) {
  const DispatchPlan& plan = ws_.plan;
  const int64_t H = config_.hidden_size, E = config_.num_experts, R = plan.num_rows();
  const ExpertFfnWeights w = experts_[0].View(config_);  // every routed expert's shape
  float* gx = Sized(grouped_x_, R * H);
  float* gy = Sized(grouped_y_, R * H);
  float* gu = Sized(gate_up_, GateUpScratch(w, R));
  float* h = Sized(hidden_, HiddenScratch(w, R));
  constexpr int64_t kRowsPerTask = 256;
  ThreadPool& pool = gate_->pool();
  pool.ParallelFor((R + kRowsPerTask - 1) / kRowsPerTask, [&](int64_t c) {
    const int64_t r0 = c * kRowsPerTask, r1 = std::min(R, r0 + kRowsPerTask);
    GatherRows(x, H, plan, r0, r1, gx + r0 * H);
    RoundThroughWire(options_.wire_dtype, gx + r0 * H, (r1 - r0) * H);
  });

  tasks_.clear();
  for (int64_t e = 0; e < E; ++e) {
    if (plan.rows_of(static_cast<int>(e)) == 0) continue;
    for (int64_t i = 0; i < NumGateUpTasks(w); ++i) tasks_.push_back({static_cast<int32_t>(e), i});
  }
  pool.ParallelFor(static_cast<int64_t>(tasks_.size()), [&](int64_t i) {
    const int32_t e = tasks_[i].expert;
    const int64_t off = plan.expert_offsets[e];
    ExpertGateUpTask(experts_[e].View(config_), gx + off * H, plan.rows_of(e), tasks_[i].index,
                     gu + GateUpScratch(w, off), h + HiddenScratch(w, off));
  });
  tasks_.clear();
  for (int64_t e = 0; e < E; ++e) {
    if (plan.rows_of(static_cast<int>(e)) == 0) continue;
    for (int64_t i = 0; i < NumDownTasks(w); ++i) tasks_.push_back({static_cast<int32_t>(e), i});
  }
  pool.ParallelFor(static_cast<int64_t>(tasks_.size()), [&](int64_t i) {
    const int32_t e = tasks_[i].expert;
    const int64_t off = plan.expert_offsets[e];
    ExpertDownTask(experts_[e].View(config_), h + HiddenScratch(w, off), plan.rows_of(e),
                   tasks_[i].index, gy + off * H);
  });
  pool.ParallelFor((R + kRowsPerTask - 1) / kRowsPerTask, [&](int64_t c) {
    const int64_t r0 = c * kRowsPerTask, r1 = std::min(R, r0 + kRowsPerTask);
    RoundThroughWire(options_.wire_dtype, gy + r0 * H, (r1 - r0) * H);
  });
}

int64_t MoeLayer::ForwardF32(const float* x, int64_t T, float* out, int32_t* topk_ids,
                             float* topk_weights) {
  std::lock_guard<std::mutex> lock(mu_);
  gate_->Route(x, T, topk_ids, topk_weights, &ws_);
  RunExperts(x);
  gate_->RunSharedExpert(x, T, &ws_);
  gate_->Combine(grouped_y_.data(), x, T, ws_, out);
  return ws_.plan.dropped;
}

}  // namespace moemesh
