#include "services/transport/ucx/device.h"

#include <cuda_runtime.h>
#include <ucp/api/ucp.h>

#include "absl/strings/str_cat.h"

namespace moemesh {
namespace {

absl::Status CudaError(const std::string& what, cudaError_t e) {
  return absl::InternalError(absl::StrCat(what, ": ", cudaGetErrorString(e)));
}

// One non-blocking stream per thread for staging copies.
cudaStream_t ThreadStream() {
  thread_local cudaStream_t stream = [] {
    cudaStream_t s = nullptr;
    if (cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking) != cudaSuccess) s = nullptr;
    return s;
  }();
  return stream;
}

}  // namespace

absl::Status UcxDevice::Pin(UcxBufferPool& pool, UcxBuffer& b) {
  if (b.pinned) return absl::OkStatus();
  pool.SetUnpin([](UcxBuffer* buffer) { cudaHostUnregister(buffer->data); });
  const cudaError_t e = cudaHostRegister(b.data, b.capacity, cudaHostRegisterDefault);
  if (e == cudaErrorHostMemoryAlreadyRegistered) {
    // Pinned already, by someone else (a CUDA-aware UCX registering the pool's memory):
    // usable for copies, and not ours to unpin.
    cudaGetLastError();
    return absl::OkStatus();
  }
  if (e != cudaSuccess) {
    cudaGetLastError();  // handled here: a later launch check must not see it
    return CudaError("cudaHostRegister of a staging buffer", e);
  }
  b.pinned = true;
  return absl::OkStatus();
}

void UcxDevice::Send(UcxExpertTransport& transport, const std::string& endpoint,
                     std::shared_ptr<const void> keep, const void* device_data, size_t size,
                     ExpertTransport::Clock::time_point deadline,
                     UcxExpertTransport::Complete complete, bool staged) {
  if (!staged && transport.cuda_direct()) {
    transport.SendInPlace(endpoint, std::move(keep), device_data, size, UCS_MEMORY_TYPE_CUDA,
                          deadline, std::move(complete));
    return;
  }
  UcxBufferPtr buffer = transport.buffers().Take(size);
  if (buffer == nullptr) {
    complete(absl::ResourceExhaustedError(absl::StrCat("no staging buffer of ", size, " bytes")),
             nullptr);
    return;
  }
  if (absl::Status s = Pin(transport.buffers(), *buffer); !s.ok()) {
    complete(s, nullptr);
    return;
  }
  cudaStream_t stream = ThreadStream();
  cudaError_t e = cudaMemcpyAsync(buffer->data, device_data, size, cudaMemcpyDeviceToHost, stream);
  if (e == cudaSuccess) e = cudaStreamSynchronize(stream);
  if (e != cudaSuccess) {
    complete(CudaError("staging a device payload", e), nullptr);
    return;
  }
  keep.reset();  // the device copy is no longer read
  transport.Send(endpoint, std::move(buffer), deadline, std::move(complete));
}

absl::Status UcxDevice::CopyToDevice(const UcxBuffer& from, void* device_to) {
  cudaStream_t stream = ThreadStream();
  cudaError_t e = cudaMemcpyAsync(device_to, from.data, from.size, cudaMemcpyHostToDevice, stream);
  if (e == cudaSuccess) e = cudaStreamSynchronize(stream);
  return e == cudaSuccess ? absl::OkStatus() : CudaError("copying a payload to the device", e);
}

}  // namespace moemesh
