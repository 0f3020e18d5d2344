// GpuGate on CUDA: part of the CUDA plugin (services/cuda_plugin.h), loaded on --device cuda.
#include "services/gpu_gate.h"
#include "services/cuda_plugin.h"

#include <cuda_runtime.h>

#include <cstring>
#include <mutex>

#include "absl/strings/str_cat.h"
#include "kernels/cuda/cublas.h"
#include "kernels/cuda/routing.cuh"

namespace moemesh {
namespace {

absl::Status CudaError(const char* what, cudaError_t e) {
  return absl::InternalError(absl::StrCat("GPU gate: ", what, ": ", cudaGetErrorString(e)));
}

#define GATE_CUDA(what, call)                          \
  do {                                                 \
    if (cudaError_t e_ = (call); e_ != cudaSuccess) {  \
      return CudaError(what, e_);                      \
    }                                                  \
  } while (0)

class CudaGpuGate final : public GpuGate {
 public:
  CudaGpuGate(const MoeModelConfig& config, int device) : config_(config), device_(device) {}

  ~CudaGpuGate() override {
    cudaSetDevice(device_);
    for (void* p : {static_cast<void*>(w_), static_cast<void*>(bias_), static_cast<void*>(correction_),
                    static_cast<void*>(x_), static_cast<void*>(logits_), static_cast<void*>(ids_),
                    static_cast<void*>(weights_), static_cast<void*>(scores_)}) {
      if (p != nullptr) cudaFree(p);
    }
    if (pinned_ != nullptr) cudaFreeHost(pinned_);
    if (handle_ != nullptr) cuda::LoadCublas()->destroy(handle_);
    if (stream_ != nullptr) cudaStreamDestroy(stream_);
  }

  absl::Status Init(const GateWeights& gate) {
    const int64_t H = config_.hidden_size, E = config_.num_experts;
    GATE_CUDA("cudaSetDevice", cudaSetDevice(device_));
    GATE_CUDA("cudaStreamCreate", cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
    const cuda::Cublas* cublas = cuda::LoadCublas();
    if (cublas == nullptr) return absl::FailedPreconditionError("--device cuda: libcublas cannot be loaded");
    if (cublas->create(&handle_) != CUBLAS_STATUS_SUCCESS ||
        cublas->set_stream(handle_, stream_) != CUBLAS_STATUS_SUCCESS) {
      handle_ = nullptr;
      return absl::InternalError("GPU gate: cublasCreate failed");
    }
    if (absl::Status s = Upload(w_, gate.weight.data<float>(), E * H); !s.ok()) return s;
    if (gate.bias.raw() != nullptr) {
      if (absl::Status s = Upload(bias_, gate.bias.data<float>(), E); !s.ok()) return s;
    }
    if (gate.correction_bias.raw() != nullptr) {
      if (absl::Status s = Upload(correction_, gate.correction_bias.data<float>(), E); !s.ok()) return s;
    }
    return absl::OkStatus();
  }

  absl::Status Route(const float* x, int64_t T, int32_t* topk_ids, float* topk_weights,
                     float* scores) override {
    if (T == 0) return absl::OkStatus();
    const int64_t H = config_.hidden_size, E = config_.num_experts, k = config_.top_k;
    std::lock_guard<std::mutex> lock(mu_);
    GATE_CUDA("cudaSetDevice", cudaSetDevice(device_));
    if (T > capacity_) {
      for (void* p : {static_cast<void*>(x_), static_cast<void*>(logits_), static_cast<void*>(ids_),
                      static_cast<void*>(weights_), static_cast<void*>(scores_)}) {
        if (p != nullptr) cudaFree(p);
      }
      if (pinned_ != nullptr) cudaFreeHost(pinned_);
      x_ = logits_ = weights_ = scores_ = nullptr;
      ids_ = nullptr;
      pinned_ = nullptr;
      capacity_ = 0;
      GATE_CUDA("hidden states", cudaMalloc(&x_, T * H * sizeof(float)));
      GATE_CUDA("logits", cudaMalloc(&logits_, T * E * sizeof(float)));
      GATE_CUDA("scores", cudaMalloc(&scores_, T * E * sizeof(float)));
      GATE_CUDA("top-k ids", cudaMalloc(&ids_, T * k * sizeof(int32_t)));
      GATE_CUDA("top-k weights", cudaMalloc(&weights_, T * k * sizeof(float)));
      GATE_CUDA("pinned", cudaMallocHost(&pinned_, T * H * sizeof(float)));
      capacity_ = T;
    }
    std::memcpy(pinned_, x, T * H * sizeof(float));
    GATE_CUDA("hidden states up", cudaMemcpyAsync(x_, pinned_, T * H * sizeof(float), cudaMemcpyHostToDevice, stream_));
    if (cuda::RouterLogits(handle_, cuda::RouterDType::kF32, x_, w_, bias_, T, H, static_cast<int>(E), logits_) !=
        CUBLAS_STATUS_SUCCESS) {
      return absl::InternalError("GPU gate: the router logits' GEMM failed");
    }
    GATE_CUDA("RouteTopK", cuda::RouteTopK(config_.routing, logits_, T, correction_, ids_, weights_,
                                           scores != nullptr ? scores_ : nullptr, stream_));
    // The results are small (T·k ids and weights): copied straight to the caller's memory.
    GATE_CUDA("top-k ids down", cudaMemcpyAsync(topk_ids, ids_, T * k * sizeof(int32_t), cudaMemcpyDeviceToHost, stream_));
    GATE_CUDA("top-k weights down",
              cudaMemcpyAsync(topk_weights, weights_, T * k * sizeof(float), cudaMemcpyDeviceToHost, stream_));
    if (scores != nullptr) {
      GATE_CUDA("scores down", cudaMemcpyAsync(scores, scores_, T * E * sizeof(float), cudaMemcpyDeviceToHost, stream_));
    }
    GATE_CUDA("cudaStreamSynchronize", cudaStreamSynchronize(stream_));
    return absl::OkStatus();
  }

 private:
  template <typename T>
  absl::Status Upload(T*& dst, const T* src, int64_t n) {
    GATE_CUDA("gate weights", cudaMalloc(&dst, n * sizeof(T)));
    GATE_CUDA("gate weights up", cudaMemcpy(dst, src, n * sizeof(T), cudaMemcpyHostToDevice));
    return absl::OkStatus();
  }

  const MoeModelConfig config_;
  const int device_;
  cudaStream_t stream_ = nullptr;
  cublasHandle_t handle_ = nullptr;
  float* w_ = nullptr;
  float* bias_ = nullptr;
  float* correction_ = nullptr;
  std::mutex mu_;
  int64_t capacity_ = 0;  // tokens the buffers below hold; guarded by mu_
  float* x_ = nullptr;
  float* logits_ = nullptr;
  int32_t* ids_ = nullptr;
  float* weights_ = nullptr;
  float* scores_ = nullptr;
  void* pinned_ = nullptr;
};

}  // namespace

absl::StatusOr<std::unique_ptr<GpuGate>> CreateCudaGpuGate(const MoeModelConfig& config, const GateWeights& gate,
                                                          int device) {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess || n == 0) {
    return absl::FailedPreconditionError("--device cuda: no CUDA device here");
  }
  if (device < 0 || device >= n) {
    return absl::InvalidArgumentError(absl::StrCat("--gpu ", device, ": this machine has ", n, " CUDA device(s)"));
  }
  auto g = std::make_unique<CudaGpuGate>(config, device);
  if (absl::Status s = g->Init(gate); !s.ok()) return s;
  return std::unique_ptr<GpuGate>(std::move(g));
}

}  // namespace moemesh
