#include "services/transport/ucx/ucp_helpers.h"

#include <ucs/config/global_opts.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/string_view.h"

namespace moemesh {
namespace ucx {

absl::Status UcsError(const std::string& what, ucs_status_t status) {
  return absl::InternalError(absl::StrCat(what, ": ", ucs_status_string(status)));
}

absl::Status SetHandler(ucp_worker_h worker, uint16_t id, ucp_am_recv_callback_t cb, void* arg) {
  ucp_am_handler_param_t p{};
  p.field_mask = UCP_AM_HANDLER_PARAM_FIELD_ID | UCP_AM_HANDLER_PARAM_FIELD_CB |
                 UCP_AM_HANDLER_PARAM_FIELD_ARG;
  p.id = id;
  p.cb = cb;
  p.arg = arg;
  const ucs_status_t s = ucp_worker_set_am_recv_handler(worker, &p);
  return s == UCS_OK ? absl::OkStatus() : UcsError("ucp_worker_set_am_recv_handler", s);
}

ucs_status_t CreateEndpoint(ucp_worker_h worker, const std::string& address,
                            ucp_err_handler_cb_t on_failure, void* arg, ucp_ep_h* ep,
                            bool* detects_failure) {
  ucp_ep_params_t params{};
  params.field_mask = UCP_EP_PARAM_FIELD_REMOTE_ADDRESS | UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE |
                      UCP_EP_PARAM_FIELD_ERR_HANDLER;
  params.address = reinterpret_cast<const ucp_address_t*>(address.data());
  params.err_mode = UCP_ERR_HANDLING_MODE_PEER;
  params.err_handler.cb = on_failure;
  params.err_handler.arg = arg;
  *detects_failure = true;
  // UCX logs an ERROR when no transport to the peer detects failures; that case is
  // expected here (shared memory) and handled below, so the message is held back.
  const ucs_log_level_t log_level = ucs_global_opts.log_component.log_level;
  ucs_global_opts.log_component.log_level = std::min(log_level, UCS_LOG_LEVEL_FATAL);
  ucs_status_t s = ucp_ep_create(worker, &params, ep);
  ucs_global_opts.log_component.log_level = log_level;
  if (s == UCS_ERR_UNREACHABLE) {
    params.field_mask &= ~(UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE | UCP_EP_PARAM_FIELD_ERR_HANDLER);
    *detects_failure = false;
    s = ucp_ep_create(worker, &params, ep);
  }
  if (s != UCS_OK) *ep = nullptr;
  return s;
}

void CloseEndpoint(ucp_ep_h ep) {
  ucp_request_param_t prm{};
  prm.op_attr_mask = UCP_OP_ATTR_FIELD_FLAGS;
  prm.flags = UCP_EP_CLOSE_FLAG_FORCE;
  const ucs_status_ptr_t req = ucp_ep_close_nbx(ep, &prm);
  if (UCS_PTR_IS_PTR(req)) ucp_request_free(req);  // completes inside the worker
}

RendezvousLanes InspectLanes(ucp_ep_h ep) {
  char* text = nullptr;
  size_t size = 0;
  FILE* f = ::open_memstream(&text, &size);
  if (f == nullptr) return {};
  ucp_ep_print_info(ep, f);
  std::fclose(f);
  RendezvousLanes lanes;
  if (text != nullptr) {
    lanes.shared_memory_only = true;
    for (absl::string_view line : absl::StrSplit(text, '\n')) {
      if (!absl::StrContains(line, "rma_bw#")) continue;
      lanes.remote_memory = true;
      if (!absl::StrContains(line, "cma/") && !absl::StrContains(line, "knem/") &&
          !absl::StrContains(line, "xpmem/")) {
        lanes.shared_memory_only = false;
      }
    }
    lanes.shared_memory_only &= lanes.remote_memory;
  }
  std::free(text);
  return lanes;
}

void ReceiveRendezvous(UcxWorkerThread& worker, void* desc, UcxBuffer* buffer,
                       ucp_am_recv_data_nbx_callback_t done, void* user_data) {
  worker.Post([&worker, desc, buffer, done, user_data] {
    worker.mutex().AssertHeld();  // posted work
    ucp_request_param_t prm{};
    prm.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA;
    prm.cb.recv_am = done;
    prm.user_data = user_data;
    if (ucp_mem_h memh = worker.Register(*buffer); memh != nullptr) {
      prm.op_attr_mask |= UCP_OP_ATTR_FIELD_MEMH;
      prm.memh = memh;
    }
    const ucs_status_ptr_t req =
        ucp_am_recv_data_nbx(worker.worker(), desc, buffer->data, buffer->size, &prm);
    if (req == nullptr) {
      done(nullptr, UCS_OK, buffer->size, user_data);
    } else if (UCS_PTR_IS_ERR(req)) {
      done(nullptr, UCS_PTR_STATUS(req), 0, user_data);
    }
  });
}

}  // namespace ucx
}  // namespace moemesh
