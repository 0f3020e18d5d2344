// The expert service's checks on a Compute request, before anything is computed: the
// same for both transports (gRPC, where the rows travel inside the protobuf, and the UCX
// data plane, where they arrive as segments beside it). Kept apart from ExpertServer so
// that they can be fuzzed alone (expert_request_fuzzer.cc); the errors are the ones
// expert_server.h lists for Compute.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "absl/status/statusor.h"
#include "expert_service.pb.h"
#include "expert_service/expert_store.h"
#include "services/base/tensor.h"
#include "services/model/model_config.h"
#include "services/transport/transport.h"

namespace moemesh {

// One batch of a Compute call, checked: its expert's weights (alive even if the expert
// is unloaded meanwhile), its rows (a view of the request's bytes) and where its rows go
// in the call's buffers ([row, row + n)).
struct ComputeBatch {
  std::shared_ptr<const ExpertWeights> weights;
  int32_t expert;
  Tensor rows;
  int64_t n, row;
};

// The request's output_dtype (F32 or BF16). INVALID_ARGUMENT when the layer is out of
// range or dense, or for any other output_dtype.
absl::StatusOr<DType> CheckComputeOutputDType(const MoeModelConfig& config,
                                              const v1::ComputeRequest& request);

// Every batch of the request, in order, with its rows as a view into the request (or into
// `rows`, batch i's bytes, when `rows` is not empty: the UCX data plane), each [n,
// hidden_size] F32 or BF16 with exactly the bytes that takes; the batches' `row` run from
// 0 without gaps. INVALID_ARGUMENT for a segment count other than the batch count, an
// expert out of range or given twice, or rows of another shape, dtype or byte count;
// NOT_FOUND (ExpertStore::Get) for an expert `store` does not hold. Call it after
// CheckComputeOutputDType (which checks the layer).
absl::StatusOr<std::vector<ComputeBatch>> CheckComputeBatches(const ExpertStore& store,
                                                              const v1::ComputeRequest& request,
                                                              const RowSegments& rows);

}  // namespace moemesh
