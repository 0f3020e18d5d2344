#include "services/transport/ucx/protocol.h"

#include <algorithm>
#include <cstring>

#include "absl/strings/str_cat.h"

namespace moemesh {
namespace ucx {
namespace {

size_t UnpaddedHeadSize(size_t count, size_t envelope_bytes) {
  return sizeof(SegmentsPrefix) + sizeof(uint64_t) * count + envelope_bytes;
}

}  // namespace

size_t SegmentedHeadSize(size_t count, size_t envelope_bytes) {
  return Aligned(UnpaddedHeadSize(count, envelope_bytes));
}

void WriteSegmentedHead(char* out, size_t count, absl::FunctionRef<uint64_t(size_t)> length,
                        const v1::ComputeRequest& envelope, size_t envelope_bytes) {
  const SegmentsPrefix prefix{static_cast<uint32_t>(count), static_cast<uint32_t>(envelope_bytes)};
  char* at = out;
  std::memcpy(at, &prefix, sizeof prefix);
  at += sizeof prefix;
  for (size_t i = 0; i < count; ++i) {
    const uint64_t n = length(i);
    std::memcpy(at, &n, sizeof n);
    at += sizeof n;
  }
  envelope.SerializeWithCachedSizesToArray(reinterpret_cast<uint8_t*>(at));
  const size_t unpadded = UnpaddedHeadSize(count, envelope_bytes);
  std::memset(out + unpadded, 0, Aligned(unpadded) - unpadded);
}

absl::Status ParseSegmented(absl::string_view in, v1::ComputeRequest* request, RowSegments* rows) {
  const auto malformed = [&](absl::string_view why) {
    return absl::InvalidArgumentError(
        absl::StrCat("malformed UCX request (", in.size(), " bytes): ", why));
  };
  SegmentsPrefix prefix;
  if (in.size() < sizeof prefix) return malformed("shorter than its prefix");
  std::memcpy(&prefix, in.data(), sizeof prefix);
  const uint64_t head = Aligned(sizeof prefix + uint64_t{8} * prefix.count + prefix.envelope);
  if (prefix.count > in.size() / 8 || head > in.size()) {
    return malformed("prefix beyond the data");
  }
  const char* lengths = in.data() + sizeof prefix;
  const char* envelope = lengths + uint64_t{8} * prefix.count;
  if (!request->ParseFromArray(envelope, static_cast<int>(prefix.envelope))) {
    return malformed("the request does not parse");
  }
  if (request->batches_size() != static_cast<int>(prefix.count)) {
    return malformed(
        absl::StrCat(prefix.count, " segments for ", request->batches_size(), " batches"));
  }
  uint64_t at = head;
  for (uint32_t i = 0; i < prefix.count; ++i) {
    uint64_t n;
    std::memcpy(&n, lengths + 8 * i, sizeof n);
    if (n > in.size() - at) return malformed(absl::StrCat("segment ", i, " runs past the end"));
    rows->emplace_back(in.data() + at, n);
    at = std::min<uint64_t>(at + Aligned(n), in.size());
  }
  if (at != in.size()) {
    return malformed(absl::StrCat(in.size() - at, " bytes after the last segment"));
  }
  return absl::OkStatus();
}

absl::Status ParseRequest(uint32_t format, absl::string_view in, v1::ComputeRequest* request,
                          RowSegments* rows) {
  switch (format) {
    case kSegmented:
      return ParseSegmented(in, request, rows);
    case kPlain:
      return request->ParseFromArray(in.data(), static_cast<int>(in.size()))
                 ? absl::OkStatus()
                 : absl::InvalidArgumentError("the UCX request does not parse as a ComputeRequest");
    default:
      return absl::InvalidArgumentError(absl::StrCat("unknown UCX request format ", format));
  }
}

absl::StatusCode CodeFromWire(int32_t code) {
  return code > 0 && code <= 16 ? static_cast<absl::StatusCode>(code) : absl::StatusCode::kUnknown;
}

}  // namespace ucx
}  // namespace moemesh
