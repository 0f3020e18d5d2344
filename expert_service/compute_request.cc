#include "expert_service/compute_request.h"

#include <string>
#include <utility>

#include "absl/strings/str_cat.h"
#include "services/base/status_macros.h"
#include "services/rpc/wire.h"

namespace moemesh {

absl::StatusOr<DType> CheckComputeOutputDType(const MoeModelConfig& config,
                                              const v1::ComputeRequest& req) {
  RETURN_IF_ERROR(config.CheckMoeLayer(req.layer()));
  const absl::StatusOr<DType> dtype = FromProtoDType(req.output_dtype());
  if (!dtype.ok() || (*dtype != DType::kF32 && *dtype != DType::kBF16)) {
    return absl::InvalidArgumentError(absl::StrCat("layer ", req.layer(), ": output_dtype ",
                                                   static_cast<int>(req.output_dtype()),
                                                   " is not F32 (1) or BF16 (2)"));
  }
  return *dtype;
}

absl::StatusOr<std::vector<ComputeBatch>> CheckComputeBatches(const ExpertStore& store,
                                                              const v1::ComputeRequest& req,
                                                              const RowSegments& row_bytes) {
  const MoeModelConfig& config = store.config();
  const int64_t layer = req.layer(), H = config.hidden_size;
  if (!row_bytes.empty() && static_cast<int>(row_bytes.size()) != req.batches_size()) {
    return absl::InvalidArgumentError(absl::StrCat("layer ", layer, ": ", row_bytes.size(),
                                                   " row segments for ", req.batches_size(),
                                                   " batches"));
  }
  std::vector<ComputeBatch> batches;
  batches.reserve(req.batches_size());
  std::vector<bool> seen(config.num_experts, false);
  int64_t row = 0;
  for (const v1::ExpertRows& b : req.batches()) {
    const int32_t e = b.expert();
    const std::string what = absl::StrCat("layer ", layer, " expert ", e);
    if (e < 0 || e >= config.num_experts) {
      return absl::InvalidArgumentError(
          absl::StrCat(what, ": expert out of range [0, ", config.num_experts, ")"));
    }
    if (seen[e]) {
      return absl::InvalidArgumentError(
          absl::StrCat(what, ": expert appears twice in the request"));
    }
    seen[e] = true;
    ASSIGN_OR_RETURN(std::shared_ptr<const ExpertWeights> weights, store.Get(layer, e));
    ASSIGN_OR_RETURN(Tensor rows, row_bytes.empty() ? FromProto(b.rows(), nullptr, what)
                                                    : FromProto(b.rows(), row_bytes[batches.size()],
                                                                nullptr, what));
    if (rows.rank() != 2 || rows.dim(1) != H) {
      return absl::InvalidArgumentError(absl::StrCat(
          what, ": rows have shape ", ShapeString(rows.shape()), ", expected [n, ", H, "]"));
    }
    if (rows.dtype() != DType::kF32 && rows.dtype() != DType::kBF16) {
      return absl::InvalidArgumentError(absl::StrCat(
          what, ": rows have dtype ", DTypeName(rows.dtype()), ", expected F32 or BF16"));
    }
    const int64_t n = rows.dim(0);
    batches.push_back({std::move(weights), e, std::move(rows), n, row});
    row += n;
  }
  return batches;
}

}  // namespace moemesh
