// GpuExperts on CUDA: part of the CUDA plugin (services/cuda_plugin.h), loaded on --device cuda.
#include "expert_service/gpu_experts.h"
#include "services/cuda_plugin.h"

#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstring>
#include <condition_variable>
#include <map>
#include <mutex>

#include "absl/strings/str_cat.h"
#include "kernels/cuda/grouped_ffn.cuh"
#include "kernels/dtype.h"
#include "services/cuda_memory.h"
#include "services/status_macros.h"

namespace moemesh {
namespace {

using cuda_memory::DeviceBuffer;
using cuda_memory::PinnedBuffer;

// The held experts of one layer, stacked: expert `experts[j]` is slot j.
struct LayerStack {
  std::vector<int32_t> experts;  // ascending
  std::vector<int32_t> slot_of;  // by expert id, -1 when not held
  DeviceBuffer gate_up, gate_up_bias, down, down_bias;
  cuda::GroupedFfnWeights weights;
  int64_t bytes() const {
    return static_cast<int64_t>(gate_up.bytes + gate_up_bias.bytes + down.bytes + down_bias.bytes);
  }
};

// One call's stream and buffers.
struct Lane {
  cudaStream_t stream = nullptr;
  PinnedBuffer x_host, y_host;
  PinnedBuffer offsets_host;
  DeviceBuffer x, h, y, offsets;
  ~Lane() {
    if (stream != nullptr) cudaStreamDestroy(stream);
  }
};

class CudaGpuExperts final : public GpuExperts {
 public:
  CudaGpuExperts(const MoeModelConfig& config, int device) : config_(config), device_(device) {}

  ~CudaGpuExperts() override {
    cudaSetDevice(device_);
    lanes_.clear();
    layers_.clear();
  }

  absl::Status Sync(const ExpertStore& store) override {
    CUDA_RETURN_IF_ERROR("cudaSetDevice", cudaSetDevice(device_));
    std::map<int64_t, std::vector<int32_t>> held;
    for (const auto& [layer, expert] : store.List()) held[layer].push_back(expert);
    std::map<int64_t, std::shared_ptr<const LayerStack>> next;
    {
      std::lock_guard<std::mutex> lock(mu_);
      next = layers_;
    }
    for (auto it = next.begin(); it != next.end();) {
      it = held.count(it->first) == 0 ? next.erase(it) : std::next(it);
    }
    for (auto& [layer, experts] : held) {
      std::sort(experts.begin(), experts.end());
      auto it = next.find(layer);
      if (it != next.end() && it->second->experts == experts) continue;
      ASSIGN_OR_RETURN(std::shared_ptr<const LayerStack> stack, Upload(store, layer, experts));
      next[layer] = std::move(stack);
    }
    std::lock_guard<std::mutex> lock(mu_);
    layers_ = std::move(next);
    return absl::OkStatus();
  }

  // Calls for the same layer that arrive while one of its launches runs wait, and the
  // next launch takes all of them together (a group commit): concurrent requests share
  // one grouped launch per stage, each expert's weights read once for all their rows.
  // Different layers launch side by side, each on a lane of its own.
  absl::Status Compute(int64_t layer, absl::Span<const GpuBatch> batches, float* y) override {
    Call me;
    int64_t out = 0;
    for (const GpuBatch& b : batches) {
      me.items.push_back({b, y + out * config_.hidden_size});
      out += b.n;
    }
    LayerQueue& q = QueueOf(layer);
    std::unique_lock<std::mutex> lock(q.mu);
    q.waiting.push_back(&me);
    while (!me.done) {
      if (q.busy) {
        q.cv.wait(lock);
        continue;
      }
      q.busy = true;
      std::vector<Call*> group;
      group.swap(q.waiting);
      lock.unlock();
      RunGroup(layer, group);
      lock.lock();
      for (Call* c : group) c->done = true;
      q.busy = false;
      q.cv.notify_all();
    }
    return me.status;
  }

  GpuMemoryReport Memory() const override {
    GpuMemoryReport r;
    r.device = device_;
    std::lock_guard<std::mutex> lock(mu_);
    for (const auto& [layer, stack] : layers_) r.weight_bytes += stack->bytes();
    for (const auto& lane : lanes_) {
      r.workspace_bytes += lane->x.bytes + lane->h.bytes + lane->y.bytes + lane->offsets.bytes;
      r.pinned_bytes += lane->x_host.bytes + lane->y_host.bytes + lane->offsets_host.bytes;
    }
    size_t free = 0, total = 0;
    if (cudaSetDevice(device_) == cudaSuccess && cudaMemGetInfo(&free, &total) == cudaSuccess) {
      r.device_free_bytes = static_cast<int64_t>(free);
      r.device_total_bytes = static_cast<int64_t>(total);
    }
    return r;
  }

 private:
  // One batch of one call, and where its output rows go.
  struct Item {
    GpuBatch batch;
    float* out;
  };
  struct Call {
    std::vector<Item> items;
    absl::Status status;
    bool done = false;  // guarded by the layer queue's mu
  };
  struct LayerQueue {
    std::mutex mu;
    std::condition_variable cv;
    std::vector<Call*> waiting;  // guarded by mu
    bool busy = false;           // a launch for the layer is running; guarded by mu
  };

  LayerQueue& QueueOf(int64_t layer) {
    std::lock_guard<std::mutex> lock(mu_);
    std::unique_ptr<LayerQueue>& q = queues_[layer];
    if (q == nullptr) q = std::make_unique<LayerQueue>();
    return *q;
  }

  // Computes the calls of `group` in one launch per stage; sets each call's status (a
  // call naming an expert not on the GPU fails alone).
  void RunGroup(int64_t layer, const std::vector<Call*>& group) {
    std::shared_ptr<const LayerStack> stack;
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto it = layers_.find(layer);
      if (it != layers_.end()) stack = it->second;
    }
    std::vector<Item> items;
    std::vector<Call*> computed;
    for (Call* c : group) {
      c->status = absl::OkStatus();
      for (const Item& item : c->items) {
        const int32_t e = item.batch.expert;
        if (stack == nullptr || e < 0 || e >= static_cast<int32_t>(stack->slot_of.size()) ||
            stack->slot_of[e] < 0) {
          c->status = absl::NotFoundError(absl::StrCat("layer ", layer, " expert ", e, ": not on the GPU"));
          break;
        }
      }
      if (!c->status.ok()) continue;
      items.insert(items.end(), c->items.begin(), c->items.end());
      computed.push_back(c);
    }
    if (computed.empty()) return;
    const absl::Status s = Launch(*stack, items);
    for (Call* c : computed) c->status = s;
  }

  // The items' rows, every expert of the stack in one grouped launch per stage.
  absl::Status Launch(const LayerStack& stack, const std::vector<Item>& items) {
    const int64_t H = config_.hidden_size, I = stack.weights.intermediate;
    const int E = stack.weights.num_experts;
    // Rows go in slot order (the kernels' grouping); start[i] is where item i's begin.
    std::vector<int64_t> first(E + 1, 0), start(items.size());
    for (const Item& item : items) first[stack.slot_of[item.batch.expert] + 1] += item.batch.n;
    for (int e = 0; e < E; ++e) first[e + 1] += first[e];
    const int64_t rows = first[E];
    {
      std::vector<int64_t> at(first.begin(), first.end() - 1);
      for (size_t i = 0; i < items.size(); ++i) {
        const int32_t slot = stack.slot_of[items[i].batch.expert];
        start[i] = at[slot];
        at[slot] += items[i].batch.n;
      }
    }
    if (rows == 0) return absl::OkStatus();

    // This thread's current device: the lane's stream and buffers live there.
    CUDA_RETURN_IF_ERROR("cudaSetDevice", cudaSetDevice(device_));
    std::unique_ptr<Lane> lane;
    ASSIGN_OR_RETURN(lane, TakeLane());
    struct GiveBack {
      CudaGpuExperts* self;
      std::unique_ptr<Lane>& lane;
      ~GiveBack() {
        if (lane == nullptr) return;
        std::lock_guard<std::mutex> lock(self->mu_);
        self->lanes_.push_back(std::move(lane));
      }
    } give_back{this, lane};
    RETURN_IF_ERROR(lane->x_host.Reserve(rows * H * 2, "pinned rows"));
    RETURN_IF_ERROR(lane->y_host.Reserve(rows * H * 4, "pinned output"));
    RETURN_IF_ERROR(lane->offsets_host.Reserve((E + 1) * sizeof(int64_t), "pinned offsets"));
    RETURN_IF_ERROR(lane->x.Reserve(rows * H * 2, "device rows"));
    RETURN_IF_ERROR(lane->h.Reserve(rows * I * 2, "device intermediate"));
    RETURN_IF_ERROR(lane->y.Reserve(rows * H * 4, "device output"));
    RETURN_IF_ERROR(lane->offsets.Reserve((E + 1) * sizeof(int64_t), "device offsets"));

    auto* x_host = static_cast<uint16_t*>(lane->x_host.ptr);
    for (size_t i = 0; i < items.size(); ++i) {
      const GpuBatch& b = items[i].batch;
      uint16_t* dst = x_host + start[i] * H;
      if (b.dtype == DType::kBF16) {
        std::memcpy(dst, b.rows, b.n * H * 2);
      } else if (!ConvertFromF32(static_cast<const float*>(b.rows), b.n * H, DType::kBF16, dst)) {
        return absl::InvalidArgumentError(absl::StrCat("expert ", b.expert, ": rows must be F32 or BF16"));
      }
    }
    std::memcpy(lane->offsets_host.ptr, first.data(), (E + 1) * sizeof(int64_t));
    const cudaStream_t s = lane->stream;
    CUDA_RETURN_IF_ERROR("rows to the GPU",
                         cudaMemcpyAsync(lane->x.ptr, x_host, rows * H * 2, cudaMemcpyHostToDevice, s));
    CUDA_RETURN_IF_ERROR("offsets to the GPU",
                         cudaMemcpyAsync(lane->offsets.ptr, lane->offsets_host.ptr, (E + 1) * sizeof(int64_t),
                                         cudaMemcpyHostToDevice, s));
    const auto* offsets = static_cast<const int64_t*>(lane->offsets.ptr);
    CUDA_RETURN_IF_ERROR("GroupedGateUpAct",
                         cuda::GroupedGateUpAct(stack.weights, static_cast<const uint16_t*>(lane->x.ptr), offsets,
                                                rows, static_cast<uint16_t*>(lane->h.ptr), s));
    CUDA_RETURN_IF_ERROR("GroupedDown",
                         cuda::GroupedDown(stack.weights, static_cast<const uint16_t*>(lane->h.ptr), offsets, rows,
                                           static_cast<float*>(lane->y.ptr), s));
    CUDA_RETURN_IF_ERROR("output from the GPU",
                         cudaMemcpyAsync(lane->y_host.ptr, lane->y.ptr, rows * H * 4, cudaMemcpyDeviceToHost, s));
    CUDA_RETURN_IF_ERROR("cudaStreamSynchronize", cudaStreamSynchronize(s));
    const auto* y_host = static_cast<const float*>(lane->y_host.ptr);
    for (size_t i = 0; i < items.size(); ++i) {
      std::memcpy(items[i].out, y_host + start[i] * H, items[i].batch.n * H * sizeof(float));
    }
    return absl::OkStatus();
  }

  absl::StatusOr<std::unique_ptr<Lane>> TakeLane() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (!lanes_.empty()) {
        std::unique_ptr<Lane> lane = std::move(lanes_.back());
        lanes_.pop_back();
        return lane;
      }
    }
    CUDA_RETURN_IF_ERROR("cudaSetDevice", cudaSetDevice(device_));
    auto lane = std::make_unique<Lane>();
    CUDA_RETURN_IF_ERROR("cudaStreamCreate", cudaStreamCreateWithFlags(&lane->stream, cudaStreamNonBlocking));
    return lane;
  }

  // One layer's experts in BF16, stacked; gate/up unpacked from the CPU layout.
  absl::StatusOr<std::shared_ptr<const LayerStack>> Upload(const ExpertStore& store, int64_t layer,
                                                           const std::vector<int32_t>& experts) {
    auto stack = std::make_shared<LayerStack>();
    stack->experts = experts;
    stack->slot_of.assign(config_.num_experts, -1);
    const int E = static_cast<int>(experts.size());
    const int64_t H = config_.hidden_size;
    int64_t I = 0;
    bool gate_up_biases = false, down_biases = false;
    std::vector<std::shared_ptr<const ExpertWeights>> held;
    for (int j = 0; j < E; ++j) {
      ASSIGN_OR_RETURN(std::shared_ptr<const ExpertWeights> w, store.Get(layer, experts[j]));
      stack->slot_of[experts[j]] = j;
      I = w->intermediate;
      gate_up_biases = w->gate_up_bias.raw() != nullptr;  // GPT-OSS
      down_biases = w->down_bias.raw() != nullptr;
      held.push_back(std::move(w));
    }
    const ExpertFfnWeights view = held.front()->View(config_);
    if (!view.gated() || H % 16 != 0 || I % 16 != 0) {
      return absl::FailedPreconditionError(absl::StrCat(
          "layer ", layer, ": the GPU kernels take gated experts with hidden and intermediate sizes "
          "that are multiples of 16 (H=", H, ", I=", I, view.gated() ? "" : ", not gated", ")"));
    }
    std::vector<uint16_t> gate_up(static_cast<size_t>(E) * 2 * I * H), down(static_cast<size_t>(E) * H * I);
    std::vector<float> gate_up_bias(gate_up_biases ? E * 2 * I : 0), down_bias(down_biases ? E * H : 0);
    for (int j = 0; j < E; ++j) {
      const ExpertWeights& w = *held[j];
      const float* packed = w.gate_up.data<float>();
      for (int64_t r = 0; r < 2 * I; ++r) {
        ConvertFromF32(packed + PackedGateUpRow(r, I) * H, H, DType::kBF16, &gate_up[(j * 2 * I + r) * H]);
        if (gate_up_biases) gate_up_bias[j * 2 * I + r] = w.gate_up_bias.data<float>()[PackedGateUpRow(r, I)];
      }
      ConvertFromF32(w.down.data<float>(), H * I, DType::kBF16, &down[j * H * I]);
      if (down_biases) std::memcpy(&down_bias[j * H], w.down_bias.data<float>(), H * sizeof(float));
    }
    auto upload = [](DeviceBuffer& dst, const void* src, size_t bytes, const char* what) -> absl::Status {
      if (bytes == 0) return absl::OkStatus();
      RETURN_IF_ERROR(dst.Reserve(bytes, what));
      CUDA_RETURN_IF_ERROR(what, cudaMemcpy(dst.ptr, src, bytes, cudaMemcpyHostToDevice));
      return absl::OkStatus();
    };
    RETURN_IF_ERROR(upload(stack->gate_up, gate_up.data(), gate_up.size() * 2, "expert gate/up weights"));
    RETURN_IF_ERROR(upload(stack->down, down.data(), down.size() * 2, "expert down weights"));
    RETURN_IF_ERROR(upload(stack->gate_up_bias, gate_up_bias.data(), gate_up_bias.size() * 4, "gate/up biases"));
    RETURN_IF_ERROR(upload(stack->down_bias, down_bias.data(), down_bias.size() * 4, "down biases"));
    cuda::GroupedFfnWeights& g = stack->weights;
    g.num_experts = E;
    g.hidden = H;
    g.intermediate = I;
    g.activation = view.activation;
    g.clamp_limit = view.clamp_limit;
    g.alpha = view.alpha;
    g.gate_up = static_cast<const uint16_t*>(stack->gate_up.ptr);
    g.down = static_cast<const uint16_t*>(stack->down.ptr);
    g.gate_up_bias = static_cast<const float*>(stack->gate_up_bias.ptr);
    g.down_bias = static_cast<const float*>(stack->down_bias.ptr);
    return std::shared_ptr<const LayerStack>(std::move(stack));
  }

  const MoeModelConfig config_;
  const int device_;
  mutable std::mutex mu_;
  std::map<int64_t, std::shared_ptr<const LayerStack>> layers_;  // guarded by mu_
  std::vector<std::unique_ptr<Lane>> lanes_;                     // idle lanes; guarded by mu_
  std::map<int64_t, std::unique_ptr<LayerQueue>> queues_;        // by layer; guarded by mu_
};

}  // namespace

absl::StatusOr<std::unique_ptr<GpuExperts>> CreateCudaGpuExperts(const MoeModelConfig& config, int device) {
  RETURN_IF_ERROR(cuda_memory::CheckDevice(device));
  if (config.hidden_size % 16 != 0) {
    return absl::FailedPreconditionError(absl::StrCat(
        "--device cuda: hidden_size ", config.hidden_size, " is not a multiple of 16 (the GPU kernels' tile)"));
  }
  return std::unique_ptr<GpuExperts>(new CudaGpuExperts(config, device));
}

}  // namespace moemesh
