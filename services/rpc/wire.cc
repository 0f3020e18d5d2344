#include "services/rpc/wire.h"

#include <cstring>
#include <limits>

#include "absl/strings/str_cat.h"

namespace moemesh {

absl::StatusOr<DType> FromProtoDType(v1::DataType dtype) {
  switch (dtype) {
    case v1::DATA_TYPE_F32:
      return DType::kF32;
    case v1::DATA_TYPE_BF16:
      return DType::kBF16;
    case v1::DATA_TYPE_F16:
      return DType::kF16;
    case v1::DATA_TYPE_I32:
      return DType::kI32;
    case v1::DATA_TYPE_I64:
      return DType::kI64;
    default:
      return absl::InvalidArgumentError(
          absl::StrCat("unsupported wire dtype ", static_cast<int>(dtype)));
  }
}

v1::DataType ToProtoDType(DType dtype) {
  switch (dtype) {
    case DType::kF32:
      return v1::DATA_TYPE_F32;
    case DType::kBF16:
      return v1::DATA_TYPE_BF16;
    case DType::kF16:
      return v1::DATA_TYPE_F16;
    case DType::kI32:
      return v1::DATA_TYPE_I32;
    case DType::kI64:
      return v1::DATA_TYPE_I64;
    default:
      return v1::DATA_TYPE_UNSPECIFIED;
  }
}

absl::Status ToWire(const Tensor& t, DType wire, char* out) {
  if (t.numel() == 0) return absl::OkStatus();  // an empty view may have no pointer
  if (t.dtype() == wire) {
    std::memcpy(out, t.raw(), t.nbytes());
    return absl::OkStatus();
  }
  if (t.dtype() != DType::kF32 || !ConvertFromF32(t.data<float>(), t.numel(), wire, out)) {
    return absl::InvalidArgumentError(
        absl::StrCat("cannot send ", DTypeName(t.dtype()), " as ", DTypeName(wire)));
  }
  return absl::OkStatus();
}

absl::Status ToProto(const Tensor& t, DType wire, v1::Tensor* out) {
  out->set_dtype(ToProtoDType(wire));
  out->clear_shape();
  for (int64_t d : t.shape()) out->add_shape(d);
  std::string* data = out->mutable_data();
  data->resize(static_cast<size_t>(t.numel()) * DTypeSize(wire));
  return ToWire(t, wire, data->data());
}

absl::StatusOr<Tensor> FromProto(const v1::Tensor& in, std::shared_ptr<const void> owner,
                                 absl::string_view what) {
  return FromProto(in, in.data(), std::move(owner), what);
}

absl::StatusOr<Tensor> FromProto(const v1::Tensor& in, absl::string_view data,
                                 std::shared_ptr<const void> owner, absl::string_view what) {
  if (data.data() != in.data().data() && !in.data().empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat(what, ": bytes both inside and outside the message"));
  }
  auto dtype = FromProtoDType(in.dtype());
  if (!dtype.ok())
    return absl::InvalidArgumentError(absl::StrCat(what, ": ", dtype.status().message()));
  std::vector<int64_t> shape(in.shape().begin(), in.shape().end());
  uint64_t numel = 1;
  for (int64_t d : shape) {
    if (d < 0)
      return absl::InvalidArgumentError(
          absl::StrCat(what, ": negative dimension in ", ShapeString(shape)));
    if (d != 0 && numel > std::numeric_limits<uint32_t>::max() * 4ull / static_cast<uint64_t>(d)) {
      return absl::InvalidArgumentError(
          absl::StrCat(what, ": shape ", ShapeString(shape), " is too large"));
    }
    numel *= static_cast<uint64_t>(d);
  }
  const uint64_t want = numel * DTypeSize(*dtype);
  if (want != data.size()) {
    return absl::InvalidArgumentError(absl::StrCat(what, ": ", DTypeName(*dtype),
                                                   ShapeString(shape), " needs ", want,
                                                   " bytes, got ", data.size()));
  }
  return Tensor::View(*dtype, std::move(shape), data.data(), std::move(owner));
}

const char* KServeDatatype(DType dtype) {
  switch (dtype) {
    case DType::kF32:
      return "FP32";
    case DType::kBF16:
      return "BF16";
    case DType::kF16:
      return "FP16";
    case DType::kI32:
      return "INT32";
    case DType::kI64:
      return "INT64";
    default:
      return "BYTES";
  }
}

absl::StatusOr<DType> DTypeFromKServe(absl::string_view datatype) {
  for (DType d : {DType::kF32, DType::kBF16, DType::kF16, DType::kI32, DType::kI64}) {
    if (datatype == KServeDatatype(d)) return d;
  }
  return absl::InvalidArgumentError(
      absl::StrCat("unsupported datatype '", std::string(datatype), "'"));
}

grpc::Status ToGrpcStatus(const absl::Status& s) {
  if (s.ok()) return grpc::Status::OK;
  return grpc::Status(static_cast<grpc::StatusCode>(s.code()), std::string(s.message()));
}

absl::Status FromGrpcStatus(const grpc::Status& s) {
  if (s.ok()) return absl::OkStatus();
  return absl::Status(static_cast<absl::StatusCode>(s.error_code()), s.error_message());
}

}  // namespace moemesh
