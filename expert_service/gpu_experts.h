// GpuExperts: the expert service's experts on GPUs (`--device cuda --gpu N[,N...]`): each
// MoE layer's held experts resident in BF16, stacked as kernels/cuda/grouped_ffn takes
// them, spread over the service's GPUs (gpu_placement.h), and a request's batches
// computed there, every expert of a GPU in one grouped launch per stage. How (lanes, group
// commit, NCCL moves between GPUs): docs/architecture.md, "The mesh".
//
// Threads: every method may be called from any thread. Calls for one layer that arrive
// while its launch runs are batched into the next; Sync and Rebalance are serialised with
// each other, and replace a layer's stacks whole, so calls on the old ones finish on them.
//
// Errors: Create fails with UNIMPLEMENTED without CUDA, FAILED_PRECONDITION without a
// device (or NCCL, for several), naming why; nothing else changes then.
#pragma once

#include <chrono>
#include <cstdint>
#include <map>
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

struct GpuExpertsOptions {
  std::vector<int> devices = {0};  // CUDA device numbers, distinct
  // How often the load across the GPUs is looked at (several GPUs only; 0: never, then
  // only Rebalance moves experts).
  std::chrono::milliseconds rebalance_interval{5000};
  // A layer is rebalanced when its most loaded GPU carries more than (1 + this) × the mean.
  double balance_tolerance = 0.15;
  // At most this many experts of a layer change GPU per round.
  int max_moves_per_layer = 4;
};

struct GpuDeviceMemory {
  int device = 0;
  int64_t experts = 0;          // (layer, expert) pairs resident
  int64_t weight_bytes = 0;     // experts' BF16 weights and biases on the device
  int64_t workspace_bytes = 0;  // lanes' device buffers
  int64_t pinned_bytes = 0;     // lanes' pinned host buffers
  int64_t device_free_bytes = 0;
  int64_t device_total_bytes = 0;
};

class GpuExperts {
 public:
  // On `options.devices`. FAILED_PRECONDITION for a model the kernels do not take (H not a
  // multiple of 16), without a device, or with several devices and no NCCL;
  // INVALID_ARGUMENT for a device that is not here or named twice.
  static absl::StatusOr<std::unique_ptr<GpuExperts>> Create(const MoeModelConfig& config,
                                                            const GpuExpertsOptions& options);
  virtual ~GpuExperts() = default;

  // Uploads every expert the store holds that the GPUs do not, drops those it no longer
  // holds. FAILED_PRECONDITION for experts the kernels do not take (I not a multiple of
  // 16, a non-gated FFN); RESOURCE_EXHAUSTED when device memory runs out. Either way the
  // old layout stays.
  virtual absl::Status Sync(const ExpertStore& store) = 0;
  // Computes the batches of `layer` (each expert at most once, all held: checked by the
  // caller); y [Σn, H] float32 host memory, batch i's rows after batch i-1's.
  virtual absl::Status Compute(int64_t layer, absl::Span<const GpuBatch> batches, float* y) = 0;
  // One balancing round now (the periodic one runs it too): the experts moved between
  // GPUs. The load counted so far then decays by half.
  virtual absl::StatusOr<int64_t> Rebalance() = 0;
  // Where each held expert of `layer` is: index into options.devices, by expert id.
  virtual std::map<int32_t, int> Placement(int64_t layer) const = 0;
  // One entry per device, in the order of options.devices.
  virtual std::vector<GpuDeviceMemory> Memory() const = 0;
  // Experts moved between GPUs so far.
  virtual int64_t moves() const = 0;
};

// What the CUDA plugin publishes for GpuExperts (services/cuda/plugin.h); Create goes
// through it.
struct GpuExpertsEntry {
  static constexpr int kVersion = 3;
  int version = kVersion;
  absl::StatusOr<std::unique_ptr<GpuExperts>> (*create)(const MoeModelConfig& config,
                                                        const GpuExpertsOptions& options) = nullptr;
};
inline constexpr char kGpuExpertsEntry[] = "moemesh_cuda_experts_v3";

}  // namespace moemesh
