// The expert service's experts on a GPU (`--device cuda`): the held experts of each MoE
// layer resident in device memory in BF16, stacked as kernels/cuda/grouped_ffn takes them,
// and a request's batches computed there, every expert of the request in one grouped
// launch per stage (gate/up with the activation fused, then down; FP32 accumulation).
//
// Per launch: the rows are packed (BF16, converted on the host from F32 when they came
// as F32) into a pinned host buffer in the stack's expert order, copied to the GPU on a
// stream of the launch's own, computed, and the FP32 result copied back into pinned
// memory. Calls for one layer that arrive while its launch runs are batched into the
// next one (a group commit: one grouped launch per stage for all of them); launches for
// different layers each have their own stream and buffers (a lane), so one's copies
// overlap another's kernels. Lanes are kept and reused.
//
// Loading: Sync uploads what the ExpertStore holds and drops what it no longer holds,
// one layer at a time; a layer's stack is immutable once built and replaced as a whole,
// so calls computing on the old one keep it until they finish.
//
// Built without CUDA (or with no device), Create fails with UNIMPLEMENTED /
// FAILED_PRECONDITION naming why; nothing else changes.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "expert_service/expert_store.h"

namespace moemesh {

struct GpuBatch {
  int32_t expert = 0;
  const void* rows = nullptr;  // [n, H] host memory, F32 or BF16
  DType dtype = DType::kF32;
  int64_t n = 0;
};

struct GpuMemoryReport {
  int device = 0;
  int64_t weight_bytes = 0;     // experts' BF16 weights and biases on the device
  int64_t workspace_bytes = 0;  // lanes' device buffers
  int64_t pinned_bytes = 0;     // lanes' pinned host buffers
  int64_t device_free_bytes = 0;
  int64_t device_total_bytes = 0;
};

class GpuExperts {
 public:
  // Whether this build has CUDA and the machine a device.
  static bool Available();
  // On `device`. FAILED_PRECONDITION for a model the kernels do not take (H or I not a
  // multiple of 16, a non-gated expert FFN), or without a device.
  static absl::StatusOr<std::unique_ptr<GpuExperts>> Create(const MoeModelConfig& config, int device);
  virtual ~GpuExperts() = default;

  // Uploads every expert the store holds that the GPU does not, drops those it no
  // longer holds. RESOURCE_EXHAUSTED when device memory runs out (the old stacks stay).
  virtual absl::Status Sync(const ExpertStore& store) = 0;
  // Computes the batches of `layer` (each expert at most once, all held: checked by the
  // caller); y [Σn, H] float32 host memory, batch i's rows after batch i-1's.
  virtual absl::Status Compute(int64_t layer, absl::Span<const GpuBatch> batches, float* y) = 0;
  virtual GpuMemoryReport Memory() const = 0;
};

}  // namespace moemesh
