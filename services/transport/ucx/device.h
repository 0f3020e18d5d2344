// Device (CUDA) payloads over the UCX data plane.
//
// Where UCX reads CUDA memory itself (a CUDA-enabled UCX: cuda_copy and cuda_ipc inside
// a node, GPUDirect RDMA over InfiniBand/RoCE; UcxExpertTransport::cuda_direct()), a
// device buffer goes to ucp_am_send_nbx as it is, with its memory type. Otherwise, as
// with Debian's UCX, it is staged: copied on a CUDA stream into a page-locked host
// buffer from the transport's registered pool (each buffer pinned once, then reused)
// and sent from there. Replies arrive in host memory; CopyToDevice moves them on.
// Built only with CUDA (MOEMESH_CUDA); its test needs a GPU.
#pragma once

#include <memory>
#include <string>

#include "absl/status/status.h"
#include "services/transport/transport.h"
#include "services/transport/ucx/buffer_pool.h"
#include "services/transport/ucx/client.h"

namespace moemesh {

class UcxDevice {
 public:
  // Sends `size` bytes of a serialized request held in device memory at `device_data`
  // (`keep` owns it; held until UCX is done with it). `staged` forces the staged path
  // (it is chosen anyway where UCX cannot read device memory).
  static void Send(UcxExpertTransport& transport, const std::string& endpoint,
                   std::shared_ptr<const void> keep, const void* device_data, size_t size,
                   ExpertTransport::Clock::time_point deadline,
                   UcxExpertTransport::Complete complete, bool staged = false);
  // Copies a received payload (host memory) to `device_to`.
  static absl::Status CopyToDevice(const UcxBuffer& from, void* device_to);
  // Page-locks a pool buffer for CUDA copies, once (undone when the pool frees it).
  static absl::Status Pin(UcxBufferPool& pool, UcxBuffer& buffer);
};

}  // namespace moemesh
