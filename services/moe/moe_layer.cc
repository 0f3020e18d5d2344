#include "services/moe/moe_layer.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "kernels/cpu/expert_ffn.h"
#include "services/base/scratch.h"
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
                                                           int64_t layer, MoeLayerOptions options) {
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

absl::StatusOr<MoeLayerOutput> MoeLayer::Forward(const Tensor& hidden) {
  const int64_t H = config_.hidden_size, k = config_.top_k;
  ASSIGN_OR_RETURN(const Tensor x, HiddenStatesAsF32(hidden, H));
  const int64_t T = x.dim(0);
  MoeLayerOutput out;
  Tensor y = Tensor::Empty(DType::kF32, {T, H});
  out.topk_ids = Tensor::Empty(DType::kI32, {T, k});
  out.topk_weights = Tensor::Empty(DType::kF32, {T, k});
  out.dropped =
      ForwardF32(x.data<float>(), T, y.mutable_data<float>(), out.topk_ids.mutable_data<int32_t>(),
                 out.topk_weights.mutable_data<float>());
  ASSIGN_OR_RETURN(out.output, OutputAs(std::move(y), hidden.dtype()));
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
  float* gx = Sized(grouped_x_, R * H);
  float* gy = Sized(grouped_y_, R * H);
  constexpr int64_t kRowsPerTask = 256;
  ThreadPool& pool = gate_->pool();
  pool.ParallelFor((R + kRowsPerTask - 1) / kRowsPerTask, [&](int64_t c) {
    const int64_t r0 = c * kRowsPerTask, r1 = std::min(R, r0 + kRowsPerTask);
    GatherRows(x, H, plan, r0, r1, gx + r0 * H);
    RoundThroughWire(options_.wire_dtype, gx + r0 * H, (r1 - r0) * H);
  });

  batches_.clear();
  for (int64_t e = 0; e < E; ++e) {
    const int64_t rows = plan.rows_of(static_cast<int>(e)), off = plan.expert_offsets[e];
    if (rows > 0) batches_.push_back({experts_[e].View(config_), gx + off * H, rows, gy + off * H});
  }
  const ExpertScratchSize scratch = ScratchFor(batches_);
  AssignScratch(batches_, Sized(gate_up_, scratch.gate_up), Sized(hidden_, scratch.hidden));
  RunExpertBatches(pool, batches_, tasks_);

  pool.ParallelFor((R + kRowsPerTask - 1) / kRowsPerTask, [&](int64_t c) {
    const int64_t r0 = c * kRowsPerTask, r1 = std::min(R, r0 + kRowsPerTask);
    RoundThroughWire(options_.wire_dtype, gy + r0 * H, (r1 - r0) * H);
  });
}

int64_t MoeLayer::ForwardF32(const float* x, int64_t T, float* out, int32_t* topk_ids,
                             float* topk_weights) {
  MutexLock lock(&mu_);
  gate_->Route(x, T, topk_ids, topk_weights, &ws_);
  RunExperts(x);
  gate_->RunSharedExpert(x, T, &ws_);
  gate_->Combine(grouped_y_.data(), x, T, ws_, out);
  return ws_.plan.dropped;
}

}  // namespace moemesh
