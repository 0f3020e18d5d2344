// GpuExperts on CUDA: part of the CUDA plugin (services/cuda/plugin.h), loaded on --device cuda.
#include <cuda_runtime_api.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstring>
#include <deque>
#include <functional>
#include <future>
#include <set>
#include <thread>

#include "absl/base/thread_annotations.h"
#include "absl/strings/str_cat.h"
#include "expert_service/gpu_experts.h"
#include "expert_service/gpu_placement.h"
#include "kernels/cuda/grouped_ffn.cuh"
#include "kernels/dtype.h"
#include "services/base/mutex.h"
#include "services/base/scratch.h"
#include "services/base/status_macros.h"
#include "services/cuda/memory.h"
#include "services/cuda/nccl_node.h"

namespace moemesh {
namespace {

using cuda_memory::DeviceBuffer;
using cuda_memory::PinnedBuffer;

// What every expert of a layer shares, for the kernels.
struct StackShape {
  int64_t intermediate = 0;
  Activation activation = Activation::kSwiGlu;
  float clamp_limit = 7.0f, alpha = 1.702f;
  bool gate_up_biases = false, down_biases = false;  // GPT-OSS
};

// The held experts of one layer on one GPU, stacked: expert `experts[j]` is slot j.
struct LayerStack {
  int device = 0;                // CUDA device number
  int rank = 0;                  // index into the node's GPUs
  std::vector<int32_t> experts;  // ascending
  std::vector<int32_t> slot_of;  // by expert id, -1 when not here
  StackShape shape;
  DeviceBuffer gate_up, gate_up_bias, down, down_bias;
  cuda::GroupedFfnWeights weights;
  ~LayerStack() { cudaSetDevice(device); }  // the buffers are freed after this, on their device
  int64_t bytes() const {
    return static_cast<int64_t>(gate_up.bytes + gate_up_bias.bytes + down.bytes + down_bias.bytes);
  }
};

// One layer over the node's GPUs; immutable once built, replaced whole.
struct NodeLayer {
  std::vector<std::shared_ptr<const LayerStack>>
      stacks;                // by rank; nullptr: none of the layer's there
  std::vector<int> rank_of;  // by expert id, -1 when not held
};

// One launch's stream and buffers; the stream is made on first use, on the calling
// thread's current device.
struct Lane {
  int device = -1;
  cudaStream_t stream = nullptr;
  PinnedBuffer x_host, y_host;
  PinnedBuffer offsets_host;
  DeviceBuffer x, h, y, offsets;
  ~Lane() {
    if (stream == nullptr) return;
    cudaSetDevice(device);
    cudaStreamDestroy(stream);
  }
  absl::Status Ready(int on_device) {
    if (stream != nullptr) return absl::OkStatus();
    device = on_device;
    CUDA_RETURN_IF_ERROR("cudaStreamCreate",
                         cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
    return absl::OkStatus();
  }
  int64_t device_bytes() const {
    return static_cast<int64_t>(x.bytes + h.bytes + y.bytes + offsets.bytes);
  }
  int64_t pinned_bytes() const {
    return static_cast<int64_t>(x_host.bytes + y_host.bytes + offsets_host.bytes);
  }
};

// A thread that runs what it is given in order (a GPU's part of a launch, several GPUs).
class Worker {
 public:
  explicit Worker(std::string name) {
    thread_ = std::thread([this, name] {
      pthread_setname_np(pthread_self(), name.substr(0, 15).c_str());
      Loop();
    });
  }
  ~Worker() {
    {
      MutexLock lock(&mu_);
      stop_ = true;
    }
    thread_.join();
  }
  void Run(std::function<void()> fn) {
    MutexLock lock(&mu_);
    queue_.push_back(std::move(fn));
  }

 private:
  bool HasWork() const ABSL_SHARED_LOCKS_REQUIRED(mu_) { return stop_ || !queue_.empty(); }
  void Loop() {
    while (true) {
      std::function<void()> fn;
      {
        MutexLock lock(&mu_);
        mu_.Await(this, &Worker::HasWork);
        if (queue_.empty()) return;  // stopped, nothing left
        fn = std::move(queue_.front());
        queue_.pop_front();
      }
      fn();
    }
  }
  Mutex mu_;
  std::deque<std::function<void()>> queue_ ABSL_GUARDED_BY(mu_);
  bool stop_ ABSL_GUARDED_BY(mu_) = false;
  std::thread thread_;
};

// One GPU of the node.
struct Gpu {
  int device = 0, rank = 0;
  FreeList<Lane> lanes;
  std::unique_ptr<Worker> worker;  // several GPUs: runs this GPU's part of a launch
};

class CudaGpuExperts final : public GpuExperts {
 public:
  CudaGpuExperts(const MoeModelConfig& config, const GpuExpertsOptions& options)
      : config_(config), options_(options) {}

  absl::Status Start() {
    for (size_t r = 0; r < options_.devices.size(); ++r) {
      auto gpu = std::make_unique<Gpu>();
      gpu->device = options_.devices[r];
      gpu->rank = static_cast<int>(r);
      if (options_.devices.size() > 1)
        gpu->worker = std::make_unique<Worker>(absl::StrCat("gpu-", gpu->device));
      gpus_.push_back(std::move(gpu));
    }
    if (gpus_.size() > 1) {
      ASSIGN_OR_RETURN(comm_, nccl::NodeComm::Create(options_.devices));
      if (options_.rebalance_interval.count() > 0) {
        balancer_ = std::thread([this] {
          pthread_setname_np(pthread_self(), "gpu-balance");
          BalanceLoop();
        });
      }
    }
    return absl::OkStatus();
  }

  ~CudaGpuExperts() override {
    {
      MutexLock lock(&balance_mu_);
      balance_stop_ = true;
    }
    if (balancer_.joinable()) balancer_.join();
    for (auto& gpu : gpus_) gpu->worker.reset();  // no launch runs now: the callers are gone
    {
      MutexLock lock(&mu_);
      layers_.clear();
    }
    gpus_.clear();  // their lanes go now, before the NCCL communicators
    comm_.reset();
  }

  absl::Status Sync(const ExpertStore& store) override {
    MutexLock sync(&sync_mu_);
    std::map<int64_t, std::vector<int32_t>> held;
    for (const auto& [layer, expert] : store.List()) held[layer].push_back(expert);
    std::map<int64_t, std::shared_ptr<const NodeLayer>> next;
    for (auto& [layer, experts] : held) {
      std::sort(experts.begin(), experts.end());
      const std::shared_ptr<const NodeLayer> prev = LayerOf(layer);
      std::vector<int> current(experts.size(), -1);
      for (size_t i = 0; i < experts.size(); ++i) {
        if (prev != nullptr) current[i] = prev->rank_of[experts[i]];
      }
      ASSIGN_OR_RETURN(const StackShape shape, ShapeOf(store, layer, experts.front()));
      ASSIGN_OR_RETURN(next[layer],
                       Relayout(&store, layer, shape, prev.get(), experts,
                                AssignLocalExperts(current, static_cast<int>(gpus_.size()))));
    }
    MutexLock lock(&mu_);
    layers_ = std::move(next);
    return absl::OkStatus();
  }

  // Calls for the same layer that arrive while one of its launches runs wait, and the
  // next launch takes all of them together (a group commit): concurrent requests share
  // one grouped launch per stage and GPU, each expert's weights read once for all their
  // rows. Different layers launch side by side, each on lanes of their own.
  absl::Status Compute(int64_t layer, absl::Span<const GpuBatch> batches, float* y) override {
    Call me;
    int64_t out = 0;
    for (const GpuBatch& b : batches) {
      me.items.push_back({b, y + out * config_.hidden_size});
      out += b.n;
    }
    LayerQueue& q = QueueOf(layer);
    q.mu.Lock();
    q.waiting.push_back(&me);
    while (!me.done) {
      if (q.busy) {
        q.cv.Wait(&q.mu);
        continue;
      }
      q.busy = true;
      std::vector<Call*> group;
      group.swap(q.waiting);
      q.mu.Unlock();
      RunGroup(layer, group);
      q.mu.Lock();
      for (Call* c : group) c->done = true;
      q.busy = false;
      q.cv.SignalAll();
    }
    q.mu.Unlock();
    return me.status;
  }

  absl::StatusOr<int64_t> Rebalance() override {
    if (gpus_.size() < 2) return 0;
    MutexLock sync(&sync_mu_);
    std::map<int64_t, std::vector<double>> load;
    {
      MutexLock lock(&load_mu_);
      load = load_;
      for (auto& [layer, rows] : load_) {
        for (double& r : rows) r *= 0.5;
      }
    }
    std::map<int64_t, std::shared_ptr<const NodeLayer>> layers;
    {
      MutexLock lock(&mu_);
      layers = layers_;
    }
    int64_t moved = 0;
    for (const auto& [layer, node] : layers) {
      const auto it = load.find(layer);
      if (it == load.end()) continue;
      std::vector<int32_t> experts;
      std::vector<int> rank;
      std::vector<double> rows;
      for (int32_t e = 0; e < static_cast<int32_t>(node->rank_of.size()); ++e) {
        if (node->rank_of[e] < 0) continue;
        experts.push_back(e);
        rank.push_back(node->rank_of[e]);
        rows.push_back(it->second[e]);
      }
      const std::vector<LocalMove> moves =
          BalanceLocalExperts(rank, rows, static_cast<int>(gpus_.size()),
                              options_.balance_tolerance, options_.max_moves_per_layer);
      if (moves.empty()) continue;
      std::vector<int> after = rank;
      for (const LocalMove& m : moves) after[m.expert] = m.to;
      int changed = 0;
      for (size_t i = 0; i < after.size(); ++i) changed += after[i] != rank[i];
      if (changed == 0) continue;
      const LayerStack* any = nullptr;
      for (const auto& s : node->stacks) {
        if (s != nullptr) any = s.get();
      }
      ASSIGN_OR_RETURN(std::shared_ptr<const NodeLayer> next,
                       Relayout(nullptr, layer, any->shape, node.get(), experts, after));
      {
        MutexLock lock(&mu_);
        layers_[layer] = std::move(next);
      }
      moved += changed;
    }
    moves_ += moved;
    return moved;
  }

  std::map<int32_t, int> Placement(int64_t layer) const override {
    std::map<int32_t, int> where;
    const std::shared_ptr<const NodeLayer> node = LayerOf(layer);
    if (node == nullptr) return where;
    for (int32_t e = 0; e < static_cast<int32_t>(node->rank_of.size()); ++e) {
      if (node->rank_of[e] >= 0) where[e] = node->rank_of[e];
    }
    return where;
  }

  std::vector<GpuDeviceMemory> Memory() const override {
    std::vector<GpuDeviceMemory> report(gpus_.size());
    {
      MutexLock lock(&mu_);
      for (const auto& [layer, node] : layers_) {
        for (const auto& stack : node->stacks) {
          if (stack == nullptr) continue;
          report[stack->rank].weight_bytes += stack->bytes();
          report[stack->rank].experts += static_cast<int64_t>(stack->experts.size());
        }
      }
    }
    for (size_t r = 0; r < gpus_.size(); ++r) {
      GpuDeviceMemory& m = report[r];
      Gpu& gpu = *gpus_[r];
      m.device = gpu.device;
      gpu.lanes.ForEachKept([&](const Lane& lane) {
        m.workspace_bytes += lane.device_bytes();
        m.pinned_bytes += lane.pinned_bytes();
      });
      size_t free = 0, total = 0;
      if (cudaSetDevice(gpu.device) == cudaSuccess &&
          cudaMemGetInfo(&free, &total) == cudaSuccess) {
        m.device_free_bytes = static_cast<int64_t>(free);
        m.device_total_bytes = static_cast<int64_t>(total);
      }
    }
    return report;
  }

  int64_t moves() const override { return moves_.load(); }

 private:
  // One batch of one call, and where its output rows go.
  struct Item {
    GpuBatch batch;
    float* out;
  };
  struct Call {
    std::vector<Item> items;
    absl::Status status;  // set by the group's runner before `done`
    bool done = false;    // written and read holding the layer queue's mu
  };
  struct LayerQueue {
    Mutex mu;
    CondVar cv;
    std::vector<Call*> waiting ABSL_GUARDED_BY(mu);
    bool busy ABSL_GUARDED_BY(mu) = false;  // a launch for the layer is running
  };
  // Where a slot of a new stack comes from: an expert already on a GPU (`stack`), or the
  // host store (nullptr).
  struct Source {
    const LayerStack* stack = nullptr;
    int slot = -1;
  };

  std::shared_ptr<const NodeLayer> LayerOf(int64_t layer) const {
    MutexLock lock(&mu_);
    auto it = layers_.find(layer);
    return it == layers_.end() ? nullptr : it->second;
  }

  LayerQueue& QueueOf(int64_t layer) {
    MutexLock lock(&mu_);
    std::unique_ptr<LayerQueue>& q = queues_[layer];
    if (q == nullptr) q = std::make_unique<LayerQueue>();
    return *q;
  }

  // Computes the calls of `group` in one launch per stage and GPU; sets each call's status
  // (a call naming an expert not on the GPUs fails alone).
  void RunGroup(int64_t layer, const std::vector<Call*>& group) {
    const std::shared_ptr<const NodeLayer> node = LayerOf(layer);
    std::vector<std::vector<Item>> items(gpus_.size());
    std::vector<Call*> computed;
    for (Call* c : group) {
      c->status = absl::OkStatus();
      for (const Item& item : c->items) {
        const int32_t e = item.batch.expert;
        if (node == nullptr || e < 0 || e >= static_cast<int32_t>(node->rank_of.size()) ||
            node->rank_of[e] < 0) {
          c->status =
              absl::NotFoundError(absl::StrCat("layer ", layer, " expert ", e, ": not on the GPU"));
          break;
        }
      }
      if (!c->status.ok()) continue;
      for (const Item& item : c->items) items[node->rank_of[item.batch.expert]].push_back(item);
      computed.push_back(c);
    }
    if (computed.empty()) return;
    if (gpus_.size() > 1) CountLoad(layer, items);
    // The other GPUs' parts on their workers, the first here; all at once.
    std::vector<std::future<absl::Status>> others;
    int here = -1;
    for (size_t r = 0; r < gpus_.size(); ++r) {
      if (items[r].empty()) continue;
      if (here < 0) {
        here = static_cast<int>(r);
        continue;
      }
      auto task = std::make_shared<std::packaged_task<absl::Status()>>(
          [this, r, &node, &items] { return Launch(*gpus_[r], *node->stacks[r], items[r]); });
      others.push_back(task->get_future());
      gpus_[r]->worker->Run([task] { (*task)(); });
    }
    absl::Status s =
        here < 0 ? absl::OkStatus() : Launch(*gpus_[here], *node->stacks[here], items[here]);
    for (auto& f : others) {
      const absl::Status other = f.get();
      if (s.ok()) s = other;
    }
    for (Call* c : computed) c->status = s;
  }

  void CountLoad(int64_t layer, const std::vector<std::vector<Item>>& items) {
    MutexLock lock(&load_mu_);
    std::vector<double>& rows = load_[layer];
    rows.resize(config_.num_experts, 0.0);
    for (const auto& part : items) {
      for (const Item& item : part) rows[item.batch.expert] += static_cast<double>(item.batch.n);
    }
  }

  // The items' rows on one GPU, every expert of its stack in one grouped launch per stage.
  absl::Status Launch(Gpu& gpu, const LayerStack& stack, const std::vector<Item>& items) {
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
    CUDA_RETURN_IF_ERROR("cudaSetDevice", cudaSetDevice(gpu.device));
    FreeList<Lane>::Lease lane = gpu.lanes.Take();
    RETURN_IF_ERROR(lane->Ready(gpu.device));
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
      } else if (b.dtype != DType::kF32 ||
                 !ConvertFromF32(static_cast<const float*>(b.rows), b.n * H, DType::kBF16, dst)) {
        return absl::InvalidArgumentError(
            absl::StrCat("expert ", b.expert, ": rows must be F32 or BF16"));
      }
    }
    std::memcpy(lane->offsets_host.ptr, first.data(), (E + 1) * sizeof(int64_t));
    if (absl::Status s = RunOnLane(*lane, stack, rows); !s.ok()) {
      // The lane goes back to the free list only once nothing of this launch still reads
      // or writes its buffers: the next launch on it rewrites them.
      cudaStreamSynchronize(lane->stream);
      cudaGetLastError();
      return s;
    }
    const auto* y_host = static_cast<const float*>(lane->y_host.ptr);
    for (size_t i = 0; i < items.size(); ++i) {
      std::memcpy(items[i].out, y_host + start[i] * H, items[i].batch.n * H * sizeof(float));
    }
    return absl::OkStatus();
  }

  // One launch's copies and kernels on `lane`'s stream, the lane's pinned rows and offsets
  // filled: rows in, both stages, the output back; returns once the output is in y_host.
  static absl::Status RunOnLane(Lane& lane, const LayerStack& stack, int64_t rows) {
    const int64_t H = stack.weights.hidden;
    const int E = stack.weights.num_experts;
    const cudaStream_t s = lane.stream;
    CUDA_RETURN_IF_ERROR(
        "rows to the GPU",
        cudaMemcpyAsync(lane.x.ptr, lane.x_host.ptr, rows * H * 2, cudaMemcpyHostToDevice, s));
    CUDA_RETURN_IF_ERROR("offsets to the GPU",
                         cudaMemcpyAsync(lane.offsets.ptr, lane.offsets_host.ptr,
                                         (E + 1) * sizeof(int64_t), cudaMemcpyHostToDevice, s));
    const auto* offsets = static_cast<const int64_t*>(lane.offsets.ptr);
    CUDA_RETURN_IF_ERROR(
        "GroupedGateUpAct",
        cuda::GroupedGateUpAct(stack.weights, static_cast<const uint16_t*>(lane.x.ptr), offsets,
                               rows, static_cast<uint16_t*>(lane.h.ptr), s));
    CUDA_RETURN_IF_ERROR("GroupedDown",
                         cuda::GroupedDown(stack.weights, static_cast<const uint16_t*>(lane.h.ptr),
                                           offsets, rows, static_cast<float*>(lane.y.ptr), s));
    CUDA_RETURN_IF_ERROR(
        "output from the GPU",
        cudaMemcpyAsync(lane.y_host.ptr, lane.y.ptr, rows * H * 4, cudaMemcpyDeviceToHost, s));
    CUDA_RETURN_IF_ERROR("cudaStreamSynchronize", cudaStreamSynchronize(s));
    return absl::OkStatus();
  }

  // The kernels' view of a layer's experts, from the store (every expert of a layer has
  // the same shape); FAILED_PRECONDITION for what the kernels do not take.
  absl::StatusOr<StackShape> ShapeOf(const ExpertStore& store, int64_t layer,
                                     int32_t expert) const {
    ASSIGN_OR_RETURN(std::shared_ptr<const ExpertWeights> w, store.Get(layer, expert));
    const ExpertFfnWeights view = w->View(config_);
    StackShape shape;
    shape.intermediate = w->intermediate;
    shape.activation = view.activation;
    shape.clamp_limit = view.clamp_limit;
    shape.alpha = view.alpha;
    shape.gate_up_biases = w->gate_up_bias.raw() != nullptr;
    shape.down_biases = w->down_bias.raw() != nullptr;
    if (!view.gated() || config_.hidden_size % 16 != 0 || shape.intermediate % 16 != 0) {
      return absl::FailedPreconditionError(absl::StrCat(
          "layer ", layer,
          ": the GPU kernels take gated experts with hidden and intermediate sizes that are "
          "multiples of 16 (H=",
          config_.hidden_size, ", I=", shape.intermediate, view.gated() ? "" : ", not gated", ")"));
    }
    return shape;
  }

  // The layer with `experts` on GPUs `rank` (by index into experts): stacks whose experts
  // do not change are kept, the others built anew, each expert's weights taken from where
  // they are resident in `prev` (a copy on the GPU, or over NCCL from another), or else
  // converted from `store`.
  absl::StatusOr<std::shared_ptr<const NodeLayer>> Relayout(const ExpertStore* store, int64_t layer,
                                                            const StackShape& shape,
                                                            const NodeLayer* prev,
                                                            const std::vector<int32_t>& experts,
                                                            const std::vector<int>& rank) {
    auto node = std::make_shared<NodeLayer>();
    node->rank_of.assign(config_.num_experts, -1);
    node->stacks.resize(gpus_.size());
    for (size_t i = 0; i < experts.size(); ++i) node->rank_of[experts[i]] = rank[i];
    for (size_t r = 0; r < gpus_.size(); ++r) {
      std::vector<int32_t> want;
      for (size_t i = 0; i < experts.size(); ++i) {
        if (rank[i] == static_cast<int>(r)) want.push_back(experts[i]);
      }
      if (want.empty()) continue;
      if (prev != nullptr && prev->stacks[r] != nullptr && prev->stacks[r]->experts == want) {
        node->stacks[r] = prev->stacks[r];
        continue;
      }
      std::vector<Source> sources(want.size());
      for (size_t j = 0; j < want.size(); ++j) {
        const int32_t e = want[j];
        if (prev == nullptr || e >= static_cast<int32_t>(prev->rank_of.size()) ||
            prev->rank_of[e] < 0)
          continue;
        const LayerStack* from = prev->stacks[prev->rank_of[e]].get();
        sources[j] = {from, from->slot_of[e]};
      }
      ASSIGN_OR_RETURN(node->stacks[r],
                       BuildStack(store, layer, shape, static_cast<int>(r), want, sources));
    }
    return std::shared_ptr<const NodeLayer>(std::move(node));
  }

  // One layer's `experts` on GPU `rank` in BF16, stacked: each slot copied from its source
  // on the GPUs, or converted from the store (gate/up unpacked from the CPU layout).
  absl::StatusOr<std::shared_ptr<const LayerStack>> BuildStack(const ExpertStore* store,
                                                               int64_t layer,
                                                               const StackShape& shape, int rank,
                                                               const std::vector<int32_t>& experts,
                                                               const std::vector<Source>& sources) {
    const Gpu& gpu = *gpus_[rank];
    CUDA_RETURN_IF_ERROR("cudaSetDevice", cudaSetDevice(gpu.device));
    auto stack = std::make_shared<LayerStack>();
    stack->device = gpu.device;
    stack->rank = rank;
    stack->experts = experts;
    stack->shape = shape;
    stack->slot_of.assign(config_.num_experts, -1);
    const int E = static_cast<int>(experts.size());
    const int64_t H = config_.hidden_size, I = shape.intermediate;
    for (int j = 0; j < E; ++j) stack->slot_of[experts[j]] = j;
    // The stack's four tensors, each E slots of `slot` bytes: gate/up 2I·H BF16, down H·I
    // BF16, biases 2I and H floats (none without biases).
    struct Part {
      DeviceBuffer LayerStack::*buffer;
      size_t slot;
      const char* what;
    };
    const Part parts[] = {
        {&LayerStack::gate_up, static_cast<size_t>(2 * I * H) * 2, "expert gate/up weights"},
        {&LayerStack::down, static_cast<size_t>(H * I) * 2, "expert down weights"},
        {&LayerStack::gate_up_bias, shape.gate_up_biases ? static_cast<size_t>(2 * I) * 4 : 0,
         "gate/up biases"},
        {&LayerStack::down_bias, shape.down_biases ? static_cast<size_t>(H) * 4 : 0,
         "down biases"}};
    for (const Part& part : parts) {
      if (part.slot > 0)
        RETURN_IF_ERROR((stack.get()->*part.buffer).Reserve(E * part.slot, part.what));
    }
    auto at = [](const LayerStack& s, const Part& part, int slot) {
      return (s.*part.buffer).as<char>() + slot * part.slot;
    };

    std::vector<nccl::NodeComm::Transfer> copies;
    std::vector<uint16_t> gate_up_host, down_host;  // sized at the first expert from the host
    std::vector<float> gub_host;
    for (int j = 0; j < E; ++j) {
      if (const Source& src = sources[j]; src.stack != nullptr) {
        for (const Part& part : parts) {
          if (part.slot == 0) continue;
          copies.push_back({src.stack->rank, rank, at(*src.stack, part, src.slot),
                            at(*stack, part, j), part.slot});
        }
        continue;
      }
      if (store == nullptr)
        return absl::InternalError("a GPU stack without a source for an expert");
      ASSIGN_OR_RETURN(std::shared_ptr<const ExpertWeights> w, store->Get(layer, experts[j]));
      if (w->intermediate != I) {
        return absl::FailedPreconditionError(
            absl::StrCat("layer ", layer, " expert ", experts[j],
                         ": intermediate size differs from the layer's"));
      }
      gate_up_host.resize(2 * I * H);
      down_host.resize(H * I);
      gub_host.resize(shape.gate_up_biases ? 2 * I : 0);
      const float* packed = w->gate_up.data<float>();
      for (int64_t row = 0; row < 2 * I; ++row) {
        ConvertFromF32(packed + PackedGateUpRow(row, I) * H, H, DType::kBF16,
                       &gate_up_host[row * H]);
        if (!gub_host.empty())
          gub_host[row] = w->gate_up_bias.data<float>()[PackedGateUpRow(row, I)];
      }
      ConvertFromF32(w->down.data<float>(), H * I, DType::kBF16, down_host.data());
      const void* host[] = {gate_up_host.data(), down_host.data(), gub_host.data(),
                            shape.down_biases ? w->down_bias.data<float>() : nullptr};
      for (int t = 0; t < 4; ++t) {
        if (parts[t].slot == 0) continue;
        CUDA_RETURN_IF_ERROR(parts[t].what, cudaMemcpy(at(*stack, parts[t], j), host[t],
                                                       parts[t].slot, cudaMemcpyHostToDevice));
      }
    }
    if (!copies.empty()) {
      if (comm_ != nullptr) {
        RETURN_IF_ERROR(comm_->Copy(copies));
      } else {
        for (const auto& c : copies) {  // one GPU: all within it
          CUDA_RETURN_IF_ERROR("copy within the GPU",
                               cudaMemcpy(c.dst, c.src, c.bytes, cudaMemcpyDeviceToDevice));
        }
      }
    }
    // The uploads and copies above ran on the legacy default stream, which the lanes'
    // non-blocking streams do not wait for: the stack is complete before any launch reads it.
    CUDA_RETURN_IF_ERROR("expert weights on the GPU", cudaStreamSynchronize(cudaStreamLegacy));
    cuda::GroupedFfnWeights& g = stack->weights;
    g.num_experts = E;
    g.hidden = H;
    g.intermediate = I;
    g.activation = shape.activation;
    g.clamp_limit = shape.clamp_limit;
    g.alpha = shape.alpha;
    g.gate_up = stack->gate_up.as<const uint16_t>();
    g.down = stack->down.as<const uint16_t>();
    g.gate_up_bias = shape.gate_up_biases ? stack->gate_up_bias.as<const float>() : nullptr;
    g.down_bias = shape.down_biases ? stack->down_bias.as<const float>() : nullptr;
    return std::shared_ptr<const LayerStack>(std::move(stack));
  }

  void BalanceLoop() {
    while (true) {
      {
        MutexLock lock(&balance_mu_);
        if (balance_mu_.AwaitWithTimeout(&balance_stop_, options_.rebalance_interval)) {
          return;
        }
      }
      const absl::StatusOr<int64_t> moved = Rebalance();
      if (!moved.ok())
        std::fprintf(stderr, "GPU rebalancing failed (the layout stays): %s\n",
                     moved.status().ToString().c_str());
    }
  }

  const MoeModelConfig config_;
  const GpuExpertsOptions options_;
  std::vector<std::unique_ptr<Gpu>> gpus_;  // by rank
  std::unique_ptr<nccl::NodeComm> comm_;    // several GPUs
  Mutex sync_mu_;                           // one Sync or Rebalance at a time
  mutable Mutex mu_;
  std::map<int64_t, std::shared_ptr<const NodeLayer>> layers_ ABSL_GUARDED_BY(mu_);
  std::map<int64_t, std::unique_ptr<LayerQueue>> queues_ ABSL_GUARDED_BY(mu_);  // by layer
  Mutex load_mu_;
  // Rows per expert id, decaying.
  std::map<int64_t, std::vector<double>> load_ ABSL_GUARDED_BY(load_mu_);
  std::atomic<int64_t> moves_{0};
  Mutex balance_mu_;
  bool balance_stop_ ABSL_GUARDED_BY(balance_mu_) = false;
  std::thread balancer_;
};

absl::StatusOr<std::unique_ptr<GpuExperts>> Create(const MoeModelConfig& config,
                                                   const GpuExpertsOptions& options) {
  if (options.devices.empty()) return absl::InvalidArgumentError("--device cuda: no GPU named");
  if (std::set<int>(options.devices.begin(), options.devices.end()).size() !=
      options.devices.size()) {
    return absl::InvalidArgumentError("--gpu: a GPU is named twice");
  }
  for (int d : options.devices) RETURN_IF_ERROR(cuda_memory::CheckDevice(d));
  if (config.hidden_size % 16 != 0) {
    return absl::FailedPreconditionError(
        absl::StrCat("--device cuda: hidden_size ", config.hidden_size,
                     " is not a multiple of 16 (the GPU kernels' tile)"));
  }
  auto experts = std::make_unique<CudaGpuExperts>(config, options);
  RETURN_IF_ERROR(experts->Start());
  return std::unique_ptr<GpuExperts>(std::move(experts));
}

const GpuExpertsEntry kEntry{GpuExpertsEntry::kVersion, &Create};

}  // namespace
}  // namespace moemesh

extern "C" __attribute__((visibility("default"))) const moemesh::GpuExpertsEntry*
moemesh_cuda_experts_v3() {
  return &moemesh::kEntry;
}
