#include "services/cuda/nccl_node.h"

#include <dlfcn.h>

#include <set>
#include <string>

#include "absl/strings/str_cat.h"
#include "kernels/cuda/dlsym.h"

namespace moemesh::nccl {
namespace {

using cuda::ResolveSymbol;

const Nccl* Load() {
  const std::string soname = "libnccl.so." + std::to_string(NCCL_MAJOR);
  void* lib = nullptr;
  // The loader's path first, then where CUDA's installer puts it.
  for (const std::string& path :
       {soname, "/usr/local/cuda/lib/" + soname, "/usr/local/cuda/lib64/" + soname}) {
    if ((lib = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL)) != nullptr) break;
  }
  if (lib == nullptr) return nullptr;
  static Nccl api;
  if (!ResolveSymbol(lib, "ncclCommInitAll", &api.comm_init_all) ||
      !ResolveSymbol(lib, "ncclCommDestroy", &api.comm_destroy) ||
      !ResolveSymbol(lib, "ncclGroupStart", &api.group_start) ||
      !ResolveSymbol(lib, "ncclGroupEnd", &api.group_end) ||
      !ResolveSymbol(lib, "ncclSend", &api.send) || !ResolveSymbol(lib, "ncclRecv", &api.recv) ||
      !ResolveSymbol(lib, "ncclGetErrorString", &api.error_string)) {
    return nullptr;
  }
  return &api;
}

absl::Status CudaStatus(const char* what, cudaError_t e) {
  return absl::InternalError(absl::StrCat(what, ": ", cudaGetErrorString(e)));
}

}  // namespace

const Nccl* LoadNccl() {
  static const Nccl* api = Load();
  return api;
}

absl::StatusOr<std::unique_ptr<NodeComm>> NodeComm::Create(const std::vector<int>& devices) {
  if (std::set<int>(devices.begin(), devices.end()).size() != devices.size() || devices.empty()) {
    return absl::InvalidArgumentError("NCCL: the GPUs must be distinct, and at least one");
  }
  const Nccl* nccl = LoadNccl();
  if (nccl == nullptr) {
    return absl::FailedPreconditionError(absl::StrCat(
        "NCCL: libnccl.so.", NCCL_MAJOR, " cannot be loaded (needed to use several GPUs)"));
  }
  auto comm = std::unique_ptr<NodeComm>(new NodeComm());
  comm->nccl_ = nccl;
  comm->devices_ = devices;
  comm->comms_.assign(devices.size(), nullptr);
  if (const ncclResult_t r = nccl->comm_init_all(comm->comms_.data(),
                                                 static_cast<int>(devices.size()), devices.data());
      r != ncclSuccess) {
    comm->comms_.clear();
    return absl::InternalError(absl::StrCat("ncclCommInitAll: ", nccl->error_string(r)));
  }
  for (int d : devices) {
    cudaStream_t s = nullptr;
    if (cudaError_t e = cudaSetDevice(d); e != cudaSuccess) return CudaStatus("cudaSetDevice", e);
    if (cudaError_t e = cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking); e != cudaSuccess) {
      return CudaStatus("cudaStreamCreate", e);
    }
    comm->streams_.push_back(s);
  }
  return comm;
}

NodeComm::~NodeComm() {
  for (size_t i = 0; i < streams_.size(); ++i) {
    cudaSetDevice(devices_[i]);
    cudaStreamDestroy(streams_[i]);
  }
  for (ncclComm_t c : comms_) {
    if (c != nullptr) nccl_->comm_destroy(c);
  }
}

absl::Status NodeComm::Copy(const std::vector<Transfer>& transfers) {
  std::vector<bool> used(devices_.size(), false);
  for (const Transfer& t : transfers) {
    if (t.from < 0 || t.to < 0 || t.from >= size() || t.to >= size()) {
      return absl::InvalidArgumentError(
          absl::StrCat("NCCL copy between ranks ", t.from, " and ", t.to, " of ", size()));
    }
    if (t.bytes == 0) continue;
    used[t.from] = used[t.to] = true;
    if (t.from == t.to) {
      if (cudaError_t e = cudaSetDevice(devices_[t.from]); e != cudaSuccess)
        return CudaStatus("cudaSetDevice", e);
      if (cudaError_t e =
              cudaMemcpyAsync(t.dst, t.src, t.bytes, cudaMemcpyDeviceToDevice, streams_[t.from]);
          e != cudaSuccess) {
        return CudaStatus("copy within a GPU", e);
      }
    }
  }
  if (const ncclResult_t r = nccl_->group_start(); r != ncclSuccess) {
    return absl::InternalError(absl::StrCat("ncclGroupStart: ", nccl_->error_string(r)));
  }
  ncclResult_t failed = ncclSuccess;
  for (const Transfer& t : transfers) {
    if (t.bytes == 0 || t.from == t.to) continue;
    ncclResult_t r = nccl_->send(t.src, t.bytes, ncclUint8, t.to, comms_[t.from], streams_[t.from]);
    if (r == ncclSuccess)
      r = nccl_->recv(t.dst, t.bytes, ncclUint8, t.from, comms_[t.to], streams_[t.to]);
    if (r != ncclSuccess && failed == ncclSuccess) failed = r;
  }
  // The group is closed whatever happened inside it.
  if (const ncclResult_t r = nccl_->group_end(); r != ncclSuccess && failed == ncclSuccess)
    failed = r;
  if (failed != ncclSuccess)
    return absl::InternalError(absl::StrCat("NCCL copy: ", nccl_->error_string(failed)));
  for (size_t i = 0; i < devices_.size(); ++i) {
    if (!used[i]) continue;
    if (cudaError_t e = cudaSetDevice(devices_[i]); e != cudaSuccess)
      return CudaStatus("cudaSetDevice", e);
    if (cudaError_t e = cudaStreamSynchronize(streams_[i]); e != cudaSuccess)
      return CudaStatus("NCCL copy", e);
  }
  return absl::OkStatus();
}

}  // namespace moemesh::nccl
