// A layer's routing on a GPU (router --device cuda): the router logits through cuBLAS
// (FP32, as HF computes them) and the fused top-k kernel (kernels/cuda/routing), with
// the CPU routing's contract and tie order; MoeGate builds its dispatch plan from the
// result as from its own. The gate weights live on the GPU; per call the hidden states
// go up through pinned memory and the top-k ids and weights (and the scores, when the
// caller wants them) come back. Calls are serialised per gate (one stream, one set of
// buffers): the router computes one layer call per request thread, and a GPU finishes a
// gate's GEMM in microseconds.
//
// Built without CUDA, or with no device, Create fails naming why.
#pragma once

#include <cstdint>
#include <memory>

#include "absl/status/statusor.h"
#include "services/model/model_config.h"
#include "services/model/moe_weights.h"

namespace moemesh {

class GpuGate {
 public:
  static absl::StatusOr<std::unique_ptr<GpuGate>> Create(const MoeModelConfig& config,
                                                         const GateWeights& gate, int device);
  virtual ~GpuGate() = default;
  // x [T, H] float32 host; topk_ids / topk_weights [T, k] host out; scores [T, E] host
  // out when not nullptr (the routing probabilities, as RouteTopK's).
  virtual absl::Status Route(const float* x, int64_t num_tokens, int32_t* topk_ids,
                             float* topk_weights, float* scores) = 0;
};

// What the CUDA plugin publishes for GpuGate (services/cuda/plugin.h); Create goes through it.
struct GpuGateEntry {
  static constexpr int kVersion = 3;
  int version = kVersion;
  absl::StatusOr<std::unique_ptr<GpuGate>> (*create)(const MoeModelConfig& config,
                                                     const GateWeights& gate, int device) = nullptr;
};
inline constexpr char kGpuGateEntry[] = "moemesh_cuda_gate_v3";

}  // namespace moemesh
