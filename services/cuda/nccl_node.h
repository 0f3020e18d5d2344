// NCCL inside one node, loaded on first use (dlopen of libnccl.so.2, as kernels/cuda/cublas.h
// loads cuBLAS): an expert service with several local GPUs needs it, one with a single GPU
// or none does not, and the binaries run where NCCL is not installed.
//
// NodeComm: one communicator per local GPU from ncclCommInitAll (one process, one rank per
// GPU), and point-to-point copies between them: each Transfer is an ncclSend on the
// source GPU's rank and the matching ncclRecv on the destination's, all of one Copy in
// one group (NVLink / NVSwitch where the node has them, PCIe otherwise), on each GPU's
// own stream; a transfer within one GPU is a device-to-device copy.
#pragma once

#include <cuda_runtime_api.h>
#include <nccl.h>

#include <memory>
#include <vector>

#include "absl/status/statusor.h"

namespace moemesh::nccl {

struct Nccl {
  decltype(&ncclCommInitAll) comm_init_all = nullptr;
  decltype(&ncclCommDestroy) comm_destroy = nullptr;
  decltype(&ncclGroupStart) group_start = nullptr;
  decltype(&ncclGroupEnd) group_end = nullptr;
  decltype(&ncclSend) send = nullptr;
  decltype(&ncclRecv) recv = nullptr;
  decltype(&ncclGetErrorString) error_string = nullptr;
};

// nullptr when libnccl cannot be loaded (or lacks one of the calls).
const Nccl* LoadNccl();

class NodeComm {
 public:
  // Over the CUDA devices `devices` (distinct); rank i is devices[i]. FAILED_PRECONDITION
  // when NCCL is not installed, INTERNAL naming NCCL's error otherwise.
  static absl::StatusOr<std::unique_ptr<NodeComm>> Create(const std::vector<int>& devices);
  ~NodeComm();
  NodeComm(const NodeComm&) = delete;
  NodeComm& operator=(const NodeComm&) = delete;

  struct Transfer {
    int from = 0, to = 0;       // ranks
    const void* src = nullptr;  // device memory on `from`
    void* dst = nullptr;        // device memory on `to`
    size_t bytes = 0;
  };
  // Runs `transfers` together and waits for them. One Copy at a time (callers serialize).
  absl::Status Copy(const std::vector<Transfer>& transfers);
  int size() const { return static_cast<int>(devices_.size()); }

 private:
  NodeComm() = default;
  const Nccl* nccl_ = nullptr;
  std::vector<int> devices_;
  std::vector<ncclComm_t> comms_;
  std::vector<cudaStream_t> streams_;
};

}  // namespace moemesh::nccl
