// For tests and benchmarks of the UCX data plane: a Compute that answers each batch with
// its own rows, wherever they travelled (inside the request, or as segments).
#pragma once

#include <string>

#include "absl/status/status.h"
#include "expert_service.pb.h"
#include "services/transport/transport.h"

namespace moemesh {

inline absl::Status EchoRows(const v1::ComputeRequest& req, const RowSegments& rows,
                             v1::ComputeResponse* resp) {
  for (int i = 0; i < req.batches_size(); ++i) {
    const v1::ExpertRows& b = req.batches(i);
    v1::ExpertRows* o = resp->add_outputs();
    o->set_expert(b.expert());
    *o->mutable_rows() = b.rows();
    if (!rows.empty()) o->mutable_rows()->set_data(std::string(rows[i]));
  }
  return absl::OkStatus();
}

}  // namespace moemesh
