// GpuGate on CUDA: part of the CUDA plugin (services/cuda/plugin.h), loaded on --device cuda.
#include <cuda_runtime.h>

#include <cstring>

#include "absl/base/thread_annotations.h"
#include "absl/strings/str_cat.h"
#include "kernels/cuda/cublas.h"
#include "kernels/cuda/routing.cuh"
#include "services/base/mutex.h"
#include "services/base/status_macros.h"
#include "services/cuda/gpu_gate.h"
#include "services/cuda/memory.h"

namespace moemesh {
namespace {

using cuda_memory::DeviceBuffer;
using cuda_memory::PinnedBuffer;

class CudaGpuGate final : public GpuGate {
 public:
  CudaGpuGate(const MoeModelConfig& config, int device) : config_(config), device_(device) {}

  ~CudaGpuGate() override {
    cudaSetDevice(device_);
    if (handle_ != nullptr) cuda::LoadCublas()->destroy(handle_);
    if (stream_ != nullptr) cudaStreamDestroy(stream_);
  }

  absl::Status Init(const GateWeights& gate) {
    const int64_t H = config_.hidden_size, E = config_.num_experts;
    CUDA_RETURN_IF_ERROR("cudaSetDevice", cudaSetDevice(device_));
    CUDA_RETURN_IF_ERROR("cudaStreamCreate",
                         cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
    const cuda::Cublas* cublas = cuda::LoadCublas();
    if (cublas == nullptr)
      return absl::FailedPreconditionError("--device cuda: libcublas cannot be loaded");
    if (cublas->create(&handle_) != CUBLAS_STATUS_SUCCESS ||
        cublas->set_stream(handle_, stream_) != CUBLAS_STATUS_SUCCESS) {
      handle_ = nullptr;
      return absl::InternalError("GPU gate: cublasCreate failed");
    }
    RETURN_IF_ERROR(Upload(w_, gate.weight.data<float>(), E * H));
    if (gate.bias.raw() != nullptr) RETURN_IF_ERROR(Upload(bias_, gate.bias.data<float>(), E));
    if (gate.correction_bias.raw() != nullptr) {
      RETURN_IF_ERROR(Upload(correction_, gate.correction_bias.data<float>(), E));
    }
    // A pageable upload may still be in flight when cudaMemcpy returns, and the routing
    // runs on a non-blocking stream that does not wait for the legacy one.
    CUDA_RETURN_IF_ERROR("gate weights on the GPU", cudaStreamSynchronize(cudaStreamLegacy));
    return absl::OkStatus();
  }

  absl::Status Route(const float* x, int64_t T, int32_t* topk_ids, float* topk_weights,
                     float* scores) override {
    if (T == 0) return absl::OkStatus();
    const int64_t H = config_.hidden_size, E = config_.num_experts, k = config_.top_k;
    MutexLock lock(&mu_);
    CUDA_RETURN_IF_ERROR("cudaSetDevice", cudaSetDevice(device_));
    RETURN_IF_ERROR(x_.Reserve(T * H * sizeof(float), "hidden states"));
    RETURN_IF_ERROR(pinned_.Reserve(T * H * sizeof(float), "pinned hidden states"));
    RETURN_IF_ERROR(logits_.Reserve(T * E * sizeof(float), "logits"));
    RETURN_IF_ERROR(scores_.Reserve(T * E * sizeof(float), "scores"));
    RETURN_IF_ERROR(ids_.Reserve(T * k * sizeof(int32_t), "top-k ids"));
    RETURN_IF_ERROR(weights_.Reserve(T * k * sizeof(float), "top-k weights"));
    std::memcpy(pinned_.ptr, x, T * H * sizeof(float));
    if (absl::Status s = RouteOnStream(T, topk_ids, topk_weights, scores); !s.ok()) {
      // Before the caller routes on the CPU into the same memory, or the next call rewrites
      // the pinned rows: nothing of this call may still be in flight.
      cudaStreamSynchronize(stream_);
      cudaGetLastError();
      return s;
    }
    return absl::OkStatus();
  }

 private:
  // The pinned rows up, the logits' GEMM and the top-k on the stream, the results down
  // into the caller's memory; returns once they are there.
  absl::Status RouteOnStream(int64_t T, int32_t* topk_ids, float* topk_weights, float* scores)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    const int64_t H = config_.hidden_size, E = config_.num_experts, k = config_.top_k;
    CUDA_RETURN_IF_ERROR("hidden states up",
                         cudaMemcpyAsync(x_.ptr, pinned_.ptr, T * H * sizeof(float),
                                         cudaMemcpyHostToDevice, stream_));
    if (cuda::RouterLogits(handle_, cuda::RouterDType::kF32, x_.ptr, w_.ptr, bias_.as<float>(), T,
                           H, static_cast<int>(E), logits_.as<float>()) != CUBLAS_STATUS_SUCCESS) {
      return absl::InternalError("GPU gate: the router logits' GEMM failed");
    }
    CUDA_RETURN_IF_ERROR(
        "RouteTopK",
        cuda::RouteTopK(config_.routing, logits_.as<float>(), T, correction_.as<float>(),
                        ids_.as<int32_t>(), weights_.as<float>(),
                        scores != nullptr ? scores_.as<float>() : nullptr, stream_));
    // The results are small (T·k ids and weights): copied straight to the caller's memory.
    CUDA_RETURN_IF_ERROR("top-k ids down",
                         cudaMemcpyAsync(topk_ids, ids_.ptr, T * k * sizeof(int32_t),
                                         cudaMemcpyDeviceToHost, stream_));
    CUDA_RETURN_IF_ERROR("top-k weights down",
                         cudaMemcpyAsync(topk_weights, weights_.ptr, T * k * sizeof(float),
                                         cudaMemcpyDeviceToHost, stream_));
    if (scores != nullptr) {
      CUDA_RETURN_IF_ERROR("scores down",
                           cudaMemcpyAsync(scores, scores_.ptr, T * E * sizeof(float),
                                           cudaMemcpyDeviceToHost, stream_));
    }
    CUDA_RETURN_IF_ERROR("cudaStreamSynchronize", cudaStreamSynchronize(stream_));
    return absl::OkStatus();
  }

 private:
  static absl::Status Upload(DeviceBuffer& dst, const float* src, int64_t n) {
    RETURN_IF_ERROR(dst.Reserve(n * sizeof(float), "gate weights"));
    CUDA_RETURN_IF_ERROR("gate weights up",
                         cudaMemcpy(dst.ptr, src, n * sizeof(float), cudaMemcpyHostToDevice));
    return absl::OkStatus();
  }

  const MoeModelConfig config_;
  const int device_;
  cudaStream_t stream_ = nullptr;
  cublasHandle_t handle_ = nullptr;
  DeviceBuffer w_, bias_, correction_;  // the gate's weights; bias_ and correction_ may stay empty
  Mutex mu_;  // one call at a time: the buffers below are per call, grown as T grows
  DeviceBuffer x_ ABSL_GUARDED_BY(mu_), logits_ ABSL_GUARDED_BY(mu_), scores_ ABSL_GUARDED_BY(mu_);
  DeviceBuffer ids_ ABSL_GUARDED_BY(mu_), weights_ ABSL_GUARDED_BY(mu_);
  PinnedBuffer pinned_ ABSL_GUARDED_BY(mu_);
};

absl::StatusOr<std::unique_ptr<GpuGate>> Create(const MoeModelConfig& config,
                                                const GateWeights& gate, int device) {
  RETURN_IF_ERROR(cuda_memory::CheckDevice(device));
  auto g = std::make_unique<CudaGpuGate>(config, device);
  if (absl::Status s = g->Init(gate); !s.ok()) return s;
  return std::unique_ptr<GpuGate>(std::move(g));
}

const GpuGateEntry kEntry{GpuGateEntry::kVersion, &Create};

}  // namespace
}  // namespace moemesh

extern "C" __attribute__((visibility("default"))) const moemesh::GpuGateEntry*
moemesh_cuda_gate_v3() {
  return &moemesh::kEntry;
}
