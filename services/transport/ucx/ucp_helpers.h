// UCP calls shared by both sides of the UCX data plane. Internal to moemesh_transport_ucx
// (it includes UCX's headers). Make them as every UCX call on a worker is made: holding its
// lock (UcxWorkerThread::mutex()), or before its thread starts.
#pragma once

#include <ucp/api/ucp.h>

#include <cstdint>
#include <string>

#include "absl/status/status.h"
#include "services/transport/ucx/buffer_pool.h"
#include "services/transport/ucx/worker_thread.h"

namespace moemesh {
namespace ucx {

// INTERNAL: `what` failed with `status`.
absl::Status UcsError(const std::string& what, ucs_status_t status);

// Send parameters: completion callback, user data, flags and the buffer's memory handle.
inline ucp_request_param_t SendParams(ucp_send_nbx_callback_t cb, void* user_data, uint32_t flags,
                                      ucp_mem_h memh) {
  ucp_request_param_t prm{};
  prm.op_attr_mask =
      UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA | UCP_OP_ATTR_FIELD_FLAGS;
  prm.cb.send = cb;
  prm.user_data = user_data;
  prm.flags = flags;
  if (memh != nullptr) {
    prm.op_attr_mask |= UCP_OP_ATTR_FIELD_MEMH;
    prm.memh = memh;
  }
  return prm;
}

// Makes `prm` describe its data as an iov (a ucp_dt_iov_t array): no memory handle then,
// one cannot cover several buffers. Over shared memory UCX 1.13 moves an iov by its
// pipelined copy rather than a cma read (see UcxExpertTransport::StartOnWorker).
inline void AsIov(ucp_request_param_t& prm) {
  prm.op_attr_mask &= ~UCP_OP_ATTR_FIELD_MEMH;
  prm.op_attr_mask |= UCP_OP_ATTR_FIELD_DATATYPE;
  prm.datatype = ucp_dt_make_iov();
}

// Frees a completed request (a null one completed in place).
inline void FreeRequest(void* request) {
  if (request != nullptr) ucp_request_free(request);
}

// What an AM callback returns for a message it does not take: UCS_OK lets UCX discard it
// (a rendezvous one is cancelled towards its sender; releasing it here as well would
// cancel it twice).
inline ucs_status_t DropMessage() { return UCS_OK; }

// Registers `cb(arg, ...)` for active messages `id` on `worker`.
absl::Status SetHandler(ucp_worker_h worker, uint16_t id, ucp_am_recv_callback_t cb, void* arg);

// Connects to a peer's worker address, with peer-failure detection where the transports
// allow it (`*detects_failure`); UCX 1.13's shared memory does not, and is connected
// without it. `on_failure(arg, ...)` may run on UCX's async thread.
ucs_status_t CreateEndpoint(ucp_worker_h worker, const std::string& address,
                            ucp_err_handler_cb_t on_failure, void* arg, ucp_ep_h* ep,
                            bool* detects_failure);
// Closes an endpoint without waiting (pending operations are cancelled).
void CloseEndpoint(ucp_ep_h ep);

// What the endpoint's rendezvous lanes are (UCX 1.13 has no query for an endpoint's
// transports; its printed configuration names the lanes): whether any reads or writes
// remote memory (RDMA, cma, ...: rendezvous then gathers an iov sender's segments, where
// over TCP, with no such lane, an iov send measured ~2.5x slower than one packed
// buffer), and whether those are all shared memory between processes of one node.
struct RendezvousLanes {
  bool remote_memory = false;
  bool shared_memory_only = false;
};
RendezvousLanes InspectLanes(ucp_ep_h ep);

// Fetches a rendezvous message (`desc` from an AM callback that returned
// UCS_INPROGRESS) into `buffer` once that callback has returned (posted to `worker`).
// `done(request, status, length, user_data)` runs with the outcome and frees the request:
// on success holding the worker's lock (its callers hand failures on with Post).
void ReceiveRendezvous(UcxWorkerThread& worker, void* desc, UcxBuffer* buffer,
                       ucp_am_recv_data_nbx_callback_t done, void* user_data);

}  // namespace ucx
}  // namespace moemesh
