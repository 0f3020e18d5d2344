// libFuzzer target for the expert service's request decoding on both transports. The first
// input byte picks the path (mod 4), the rest is the message:
//   0  gRPC: a serialized v1::ComputeRequest, the rows inside it;
//   1  UCX kPlain: ucx::ParseRequest(kPlain, ...), the same bytes over the data plane;
//   2  UCX kSegmented: ucx::ParseRequest(kSegmented, ...), prefix, segment lengths,
//      envelope and row segments (services/transport/ucx/protocol.h);
//   3  UCX with an unknown format, which must be refused.
// A request that decodes then goes through Compute's checks (compute_request.h) against an
// expert store of a small generated model (DeepSeek-V3 layout: hidden 8, 8 experts, 3
// layers of which layer 0 is dense; layer 1 holds experts 0-5, layer 2 all 8).
// Invariants: every row segment lies inside the received buffer, in order, each non-empty
// one starting kAlign-aligned past the head, one per batch; whatever the checks accept is
// what the compute reads without looking again: each batch's rows [n, 8] F32 or BF16 of
// exactly n × 8 × dtype-size bytes lying in its own segment or its own protobuf field (all
// of them are read, as the compute converts them), experts in range, held and distinct,
// rows numbered from 0 without gaps. Errors are INVALID_ARGUMENT, or NOT_FOUND for an
// expert the store does not hold.
//
//   ninja -C build-fuzz expert_request_fuzzer
//   build-fuzz/expert_service/expert_request_fuzzer tests/fuzz_corpus/expert_request
// The committed seeds come from the target itself:
//   build-fuzz/expert_service/expert_request_fuzzer --write_seeds=tests/fuzz_corpus/expert_request
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <set>
#include <string>
#include <vector>

#include "expert_service.pb.h"
#include "expert_service/compute_request.h"
#include "expert_service/expert_store.h"
#include "kernels/dtype.h"
#include "services/model/model_generator.h"
#include "services/transport/ucx/protocol.h"

namespace moemesh {
namespace {

constexpr int64_t kHidden = 8;
constexpr int kPathGrpc = 0, kPathPlain = 1, kPathSegmented = 2, kPathUnknown = 3;

void Check(bool ok, const char* what) {
  if (!ok) {
    std::fprintf(stderr, "invariant violated: %s\n", what);
    std::abort();
  }
}

// The store, made once: a generated checkpoint in a temporary folder, its experts read
// into memory, the folder removed.
const ExpertStore& Store() {
  static const ExpertStore* const store = [] {
    char tmpl[] = "/tmp/expert_request_fuzzer.XXXXXX";
    Check(mkdtemp(tmpl) != nullptr, "mkdtemp");
    GenModelOptions o = SmallModelOptions(ModelFamily::kDeepseekV3);
    o.hidden = kHidden;
    o.intermediate = 8;
    o.shared_intermediate = 8;
    o.layers = 3;
    Check(GenerateModel(tmpl, o).ok(), "generate the model");
    absl::StatusOr<std::unique_ptr<ExpertStore>> s = ExpertStore::Open(tmpl);
    Check(s.ok(), "open the store");
    std::vector<ExpertKey> keys;
    for (int32_t e = 0; e < 6; ++e) keys.push_back({1, e});
    for (int32_t e = 0; e < 8; ++e) keys.push_back({2, e});
    Check((*s)->Load(keys).ok(), "load the experts");
    std::filesystem::remove_all(tmpl);
    return s->release();
  }();
  return *store;
}

// True when [p, p + n) lies inside [begin, begin + size).
bool Inside(const void* p, size_t n, const void* begin, size_t size) {
  const auto a = reinterpret_cast<uintptr_t>(p), b = reinterpret_cast<uintptr_t>(begin);
  return n == 0 || (a >= b && a - b <= size && n <= size - (a - b));
}

void CheckSegments(const std::vector<char>& buf, const v1::ComputeRequest& req,
                   const RowSegments& rows) {
  Check(static_cast<int>(rows.size()) == req.batches_size(), "one segment per batch");
  ucx::SegmentsPrefix prefix;
  Check(buf.size() >= sizeof prefix, "an accepted request has its prefix");
  std::memcpy(&prefix, buf.data(), sizeof prefix);
  const uint64_t head = ucx::Aligned(sizeof prefix + 8 * uint64_t{prefix.count} + prefix.envelope);
  Check(head <= buf.size(), "the head lies inside the buffer");
  uint64_t at = head;
  for (size_t i = 0; i < rows.size(); ++i) {
    Check(Inside(rows[i].data(), rows[i].size(), buf.data(), buf.size()),
          "segment inside the buffer");
    if (rows[i].empty()) continue;
    const uint64_t offset = rows[i].data() - buf.data();
    Check(offset >= at, "segments in order, after the head, not overlapping");
    Check(offset % ucx::kAlign == 0, "non-empty segments start aligned");
    at = offset + rows[i].size();
  }
}

void CheckBatches(const v1::ComputeRequest& req, const RowSegments& rows,
                  const std::vector<ComputeBatch>& batches) {
  const ExpertStore& store = Store();
  Check(store.config().IsMoeLayer(req.layer()), "the layer is a MoE layer");
  Check(static_cast<int>(batches.size()) == req.batches_size(), "one batch per request batch");
  std::set<int32_t> experts;
  int64_t row = 0;
  std::vector<float> x;
  for (size_t i = 0; i < batches.size(); ++i) {
    const ComputeBatch& b = batches[i];
    Check(b.expert == req.batches(static_cast<int>(i)).expert(), "batches in request order");
    Check(b.expert >= 0 && b.expert < store.config().num_experts, "expert in range");
    Check(experts.insert(b.expert).second, "experts distinct");
    Check(b.weights != nullptr && store.Get(req.layer(), b.expert).ok(), "expert held");
    Check(b.rows.rank() == 2 && b.rows.dim(1) == kHidden && b.rows.dim(0) == b.n && b.n >= 0,
          "rows [n, hidden]");
    Check(b.rows.dtype() == DType::kF32 || b.rows.dtype() == DType::kBF16, "rows F32 or BF16");
    Check(b.rows.nbytes() == static_cast<uint64_t>(b.n) * kHidden * DTypeSize(b.rows.dtype()),
          "nbytes == n * hidden * dtype size");
    if (!rows.empty()) {
      Check(b.rows.raw() == rows[i].data() || b.rows.nbytes() == 0, "rows are their segment");
      Check(b.rows.nbytes() == rows[i].size(), "rows are all of their segment");
    } else {
      const std::string& data = req.batches(static_cast<int>(i)).rows().data();
      Check(b.rows.nbytes() == data.size() &&
                Inside(b.rows.raw(), b.rows.nbytes(), data.data(), data.size()),
            "rows are their protobuf field");
    }
    Check(b.row == row, "rows numbered without gaps");
    row += b.n;
    // Read the rows as the compute does (ASan catches a view that runs off).
    x.resize(b.n * kHidden + 1);
    Check(ConvertToF32(b.rows.dtype(), b.rows.raw(), b.n * kHidden, x.data()), "convert");
  }
}

void Run(int path, const uint8_t* data, size_t size) {
  // A buffer of the message's exact size, as the transport hands it over.
  const std::vector<char> buf(data, data + size);
  const absl::string_view in(buf.data(), buf.size());
  v1::ComputeRequest req;
  RowSegments rows;
  if (path == kPathGrpc) {
    if (!req.ParseFromArray(buf.data(), static_cast<int>(buf.size()))) return;
  } else {
    const uint32_t format = path == kPathPlain       ? ucx::kPlain
                            : path == kPathSegmented ? ucx::kSegmented
                                                     : 2 + (size > 0 ? buf[0] & 0xff : 0);
    const absl::Status parsed = ucx::ParseRequest(format, in, &req, &rows);
    if (!parsed.ok()) {
      Check(parsed.code() == absl::StatusCode::kInvalidArgument, "refused: INVALID_ARGUMENT");
      Check(!parsed.message().empty(), "error without a message");
      return;
    }
    Check(path != kPathUnknown, "an unknown format is refused");
    if (path == kPathPlain) Check(rows.empty(), "kPlain has no segments");
    if (path == kPathSegmented) CheckSegments(buf, req, rows);
  }
  const ExpertStore& store = Store();
  const absl::StatusOr<DType> out = CheckComputeOutputDType(store.config(), req);
  absl::StatusOr<std::vector<ComputeBatch>> batches =
      out.ok() ? CheckComputeBatches(store, req, rows)
               : absl::StatusOr<std::vector<ComputeBatch>>(out.status());
  if (!batches.ok()) {
    const absl::StatusCode code = batches.status().code();
    Check(code == absl::StatusCode::kInvalidArgument || code == absl::StatusCode::kNotFound,
          "refused: INVALID_ARGUMENT or NOT_FOUND");
    Check(!batches.status().message().empty(), "error without a message");
    return;
  }
  Check(*out == DType::kF32 || *out == DType::kBF16, "output dtype F32 or BF16");
  CheckBatches(req, rows, *batches);
}

// --- Seeds (--write_seeds=DIR) ---

std::string Rows(int64_t n, v1::DataType dtype) {
  const size_t size = dtype == v1::DATA_TYPE_F32 ? 4 : 2;
  std::string s(n * kHidden * size, '\0');
  for (size_t i = 0; i < s.size(); ++i) s[i] = static_cast<char>(i % size == size - 1 ? 0x3f : i);
  return s;
}

v1::ComputeRequest Request(int64_t layer, v1::DataType out,
                           std::vector<std::pair<int32_t, int64_t>> batches,
                           v1::DataType dtype = v1::DATA_TYPE_F32) {
  v1::ComputeRequest req;
  req.set_layer(layer);
  req.set_placement_epoch(3);
  req.set_output_dtype(out);
  for (const auto& [expert, n] : batches) {
    v1::ExpertRows* b = req.add_batches();
    b->set_expert(expert);
    b->mutable_rows()->set_dtype(dtype);
    b->mutable_rows()->add_shape(n);
    b->mutable_rows()->add_shape(kHidden);
    b->mutable_rows()->set_data(Rows(n, dtype));
  }
  return req;
}

// The segmented format as the router writes it (UcxExpertTransport).
std::string Segmented(v1::ComputeRequest req) {
  std::vector<std::string> segments;
  for (v1::ExpertRows& b : *req.mutable_batches()) {
    segments.push_back(b.rows().data());
    b.mutable_rows()->clear_data();
  }
  const size_t envelope = req.ByteSizeLong();
  std::string out(ucx::SegmentedHeadSize(segments.size(), envelope), '\0');
  ucx::WriteSegmentedHead(
      out.data(), segments.size(), [&](size_t i) { return segments[i].size(); }, req, envelope);
  for (const std::string& s : segments) {
    out += s;
    out.resize(ucx::Aligned(out.size()), '\0');
  }
  return out;
}

void WriteSeeds(const std::string& dir) {
  std::vector<std::pair<std::string, std::string>> seeds;
  const auto add = [&](const std::string& name, int path, const std::string& message) {
    seeds.push_back({name, std::string(1, static_cast<char>(path)) + message});
  };
  const v1::ComputeRequest two = Request(1, v1::DATA_TYPE_F32, {{0, 2}, {3, 1}});
  const v1::ComputeRequest bf16 =
      Request(2, v1::DATA_TYPE_BF16, {{7, 1}, {1, 3}, {4, 0}}, v1::DATA_TYPE_BF16);
  add("grpc_f32", kPathGrpc, two.SerializeAsString());
  add("grpc_bf16", kPathGrpc, bf16.SerializeAsString());
  add("ucx_plain_f32", kPathPlain, two.SerializeAsString());
  add("ucx_segmented_f32", kPathSegmented, Segmented(two));
  add("ucx_segmented_bf16_empty_batch", kPathSegmented, Segmented(bf16));
  add("ucx_segmented_no_batches", kPathSegmented, Segmented(Request(1, v1::DATA_TYPE_F32, {})));
  // Refused.
  add("refused_dense_layer", kPathGrpc,
      Request(0, v1::DATA_TYPE_F32, {{0, 1}}).SerializeAsString());
  add("refused_not_held", kPathGrpc, Request(1, v1::DATA_TYPE_F32, {{7, 1}}).SerializeAsString());
  add("refused_expert_twice", kPathPlain,
      Request(1, v1::DATA_TYPE_F32, {{2, 1}, {2, 1}}).SerializeAsString());
  add("refused_output_dtype", kPathGrpc,
      Request(1, v1::DATA_TYPE_I32, {{0, 1}}).SerializeAsString());
  {
    v1::ComputeRequest r = two;
    r.mutable_batches(0)->mutable_rows()->mutable_data()->pop_back();
    add("refused_short_rows", kPathGrpc, r.SerializeAsString());
  }
  {
    std::string s = Segmented(two);
    s.resize(s.size() - ucx::kAlign);
    add("refused_segment_past_end", kPathSegmented, s);
  }
  add("refused_trailing_bytes", kPathSegmented, Segmented(two) + std::string(ucx::kAlign, '\0'));
  {
    // The rows both in the envelope and in a segment.
    const v1::ComputeRequest& r = two;
    const size_t envelope = r.ByteSizeLong();
    std::string head(ucx::SegmentedHeadSize(2, envelope), '\0');
    ucx::WriteSegmentedHead(
        head.data(), 2,
        [&](size_t i) { return r.batches(static_cast<int>(i)).rows().data().size(); }, r, envelope);
    for (const auto& b : r.batches()) {
      head += b.rows().data();
      head.resize(ucx::Aligned(head.size()), '\0');
    }
    add("refused_rows_inside_and_outside", kPathSegmented, head);
  }
  add("refused_unknown_format", kPathUnknown, two.SerializeAsString());
  for (const auto& [name, bytes] : seeds) {
    std::ofstream(dir + "/" + name, std::ios::binary) << bytes;
  }
  std::printf("wrote %zu seeds to %s\n", seeds.size(), dir.c_str());
}

}  // namespace
}  // namespace moemesh

extern "C" int LLVMFuzzerInitialize(int* argc, char*** argv) {
  moemesh::Store();
  for (int i = 1; i < *argc; ++i) {
    const std::string arg = (*argv)[i];
    if (arg.rfind("--write_seeds=", 0) == 0) {
      moemesh::WriteSeeds(arg.substr(std::strlen("--write_seeds=")));
      std::exit(0);
    }
  }
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  moemesh::Run(data[0] % 4, data + 1, size - 1);
  return 0;
}
