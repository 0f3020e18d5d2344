// The UCX data plane's wire protocol: the UCP active messages that UcxExpertTransport
// (client.h) and UcxComputeServer (compute_server.h) exchange, and the request formats
// (docs/architecture.md, "UCX data plane"). Headers travel as these structs are laid out in
// memory; kMagic marks each message as ours.
//
//   hello    kHelloAm, client -> service, once per connection: HelloHeader, with the
//            credential the service's Info gave this client over the authenticated gRPC
//            control plane; data = the client's worker address (the service connects back
//            to it and replies there). A hello without a valid credential is dropped, and
//            so is every request from a client whose hello was not accepted, unread.
//   request  kRequestAm: RequestHeader; data = the request in its `format`.
//   reply    kReplyAm: ReplyHeader; data = the serialized v1::ComputeResponse when `code`
//            is 0, the error message otherwise.
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>

#include "absl/functional/function_ref.h"
#include "absl/status/status.h"
#include "absl/strings/string_view.h"
#include "expert_service.pb.h"
#include "services/transport/transport.h"

namespace moemesh {

// How long a waiting thread (or an idle service worker) polls before it sleeps; 0: never.
constexpr std::chrono::microseconds kUcxDefaultSpin{1000};
// Requests up to this size are computed on the service's worker thread when its compute
// threads are idle, and polled for by the router's waiting thread; over shared memory,
// payloads above it go as an iov (see UcxExpertTransport::StartOnWorker).
constexpr size_t kUcxInlineBytes = 64 << 10;

namespace ucx {

constexpr uint16_t kRequestAm = 1;
constexpr uint16_t kReplyAm = 2;
constexpr uint16_t kHelloAm = 3;
constexpr uint64_t kMagic = 0x314873654d656f4dULL;  // "MoeMesh1"

// A credential: kCredentialIdBytes naming it, then the secret the service compares in
// constant time.
constexpr size_t kCredentialIdBytes = 16;
constexpr size_t kCredentialBytes = 32;

struct HelloHeader {
  uint64_t magic;
  uint64_t client;  // random: it also marks the client's requests
  uint8_t credential[kCredentialBytes];
};

struct RequestHeader {
  uint64_t magic;
  uint64_t id;
  uint64_t client;
  uint32_t format;  // kPlain or kSegmented
  uint32_t reserved;
};

struct ReplyHeader {
  uint64_t magic;
  uint64_t id;
  int32_t code;  // absl::StatusCode
  uint32_t reserved;
};

// Request data formats. kPlain: a serialized v1::ComputeRequest. kSegmented: a
// SegmentsPrefix, `count` u64 segment lengths, the serialized request with every batch's
// rows data empty (`envelope` bytes), then batch i's row bytes as segment i; the head
// and every segment padded with zeros to kAlign bytes, so the rows the service computes
// on where they land start aligned (the buffers are page-aligned).
constexpr uint32_t kPlain = 0;
constexpr uint32_t kSegmented = 1;
constexpr size_t kAlign = 64;
inline size_t Aligned(size_t n) { return (n + kAlign - 1) / kAlign * kAlign; }
struct SegmentsPrefix {
  uint32_t count;
  uint32_t envelope;
};

// The size of a segmented request's head (prefix, lengths, envelope, padding) for `count`
// segments and an envelope of `envelope_bytes` (its ByteSizeLong()).
size_t SegmentedHeadSize(size_t count, size_t envelope_bytes);
// Writes that head at `out` (SegmentedHeadSize bytes): segment i's length is `length(i)`;
// `envelope` is serialized with the sizes its ByteSizeLong() cached, `envelope_bytes`.
void WriteSegmentedHead(char* out, size_t count, absl::FunctionRef<uint64_t(size_t)> length,
                        const v1::ComputeRequest& envelope, size_t envelope_bytes);

// A request in the segmented format: the envelope parsed into `request`, views of the row
// bytes (into `in`) appended to `rows`. INVALID_ARGUMENT naming what is wrong with a bad or
// hostile one.
absl::Status ParseSegmented(absl::string_view in, v1::ComputeRequest* request, RowSegments* rows);
// A request's data in `format`: kSegmented as ParseSegmented, kPlain into `request` alone
// (`rows` left empty); INVALID_ARGUMENT if it does not parse or the format is unknown.
absl::Status ParseRequest(uint32_t format, absl::string_view in, v1::ComputeRequest* request,
                          RowSegments* rows);

// A reply's status code as absl's (UNKNOWN for one out of range).
absl::StatusCode CodeFromWire(int32_t code);

}  // namespace ucx
}  // namespace moemesh
