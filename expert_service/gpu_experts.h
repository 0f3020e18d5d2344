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
// Several local GPUs (--gpu 0,1,...): each layer's experts are spread over them
// (expert_service/gpu_placement.h: an even spread, new experts to the GPU with fewest),
// and a call's batches go to the GPUs that hold their experts, each GPU's rows copied to
// it straight from pinned host memory (over its own PCIe link, all GPUs at once: rows
// arrive in host memory, so staging them on one GPU first would only add a hop) and
// computed there while the others compute theirs. The load each expert sees is counted,
// and every rebalance interval the experts of a layer whose GPUs are unevenly loaded are
// swapped or moved between the GPUs, their weights copied GPU to GPU over NCCL
// (services/cuda/nccl_node.h; NVLink where the node has it), never re-read from the host; the
// new layout takes over whole, as after a Sync. Written for eight GPUs; runs with one.
//
// Built without CUDA (or with no device), Create fails with UNIMPLEMENTED /
// FAILED_PRECONDITION naming why; nothing else changes.
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
  // Whether this build has CUDA and the machine a device; how many devices (0 on any error).
  static bool Available() { return DeviceCount() > 0; }
  static int DeviceCount();
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
