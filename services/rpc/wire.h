// Tensors and statuses at the RPC edge: the one place that converts between Tensor and
// moemesh.v1.Tensor, and between absl::Status and grpc::Status.
#pragma once

#include <grpcpp/support/status.h>

#include <cstdint>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "services/base/tensor.h"
#include "tensor.pb.h"

namespace moemesh {

absl::StatusOr<DType> FromProtoDType(v1::DataType dtype);
v1::DataType ToProtoDType(DType dtype);

// Writes `t` into `out`, converted to `wire` (F32 or BF16; t must be F32, or already
// `wire`).
absl::Status ToProto(const Tensor& t, DType wire, v1::Tensor* out);
// Writes `t`'s values as `wire` (a copy, or a conversion from F32) to `out`, which has
// t.numel() * DTypeSize(wire) bytes.
absl::Status ToWire(const Tensor& t, DType wire, char* out);

// A view of `in`'s bytes (kept alive by `owner`, normally the request), validated: known
// dtype, non-negative shape, byte count = elements × size. `what` names the tensor in
// errors ("batch 3 of layer 1").
absl::StatusOr<Tensor> FromProto(const v1::Tensor& in, std::shared_ptr<const void> owner,
                                 absl::string_view what);
// The same with the bytes given apart from `in` (whose own data must then be empty): rows
// that travelled outside the protobuf (the UCX data plane's segments).
absl::StatusOr<Tensor> FromProto(const v1::Tensor& in, absl::string_view data,
                                 std::shared_ptr<const void> owner, absl::string_view what);

// KServe v2 datatype names ("FP32", "BF16", "FP16", "INT32", "INT64") and back.
const char* KServeDatatype(DType dtype);
absl::StatusOr<DType> DTypeFromKServe(absl::string_view datatype);

// Maps a status at the service edge. Codes carry over one to one.
grpc::Status ToGrpcStatus(const absl::Status& s);
absl::Status FromGrpcStatus(const grpc::Status& s);

}  // namespace moemesh
