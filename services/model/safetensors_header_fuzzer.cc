// libFuzzer target for ParseSafetensorsHeader. Any header the parser accepts must
// describe tensors that lie inside the data section, do not overlap, and hold exactly
// numel × dtype-size bytes: the zero-copy views handed out later rely on all three.
//
//   ninja -C build-fuzz safetensors_header_fuzzer
//   build-fuzz/services/model/safetensors_header_fuzzer tests/fuzz_corpus/safetensors
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <utility>
#include <vector>

#include "services/model/safetensors.h"

namespace {

void Check(bool ok, const char* what) {
  if (!ok) {
    std::fprintf(stderr, "invariant violated: %s\n", what);
    std::abort();
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  absl::StatusOr<moemesh::SafetensorsHeader> header =
      moemesh::ParseSafetensorsHeader(data, size, "fuzz.safetensors");
  if (!header.ok()) {
    Check(!header.status().message().empty(), "error without a message");
    return 0;
  }
  Check(header->data_start >= 8 && header->data_start <= size, "data_start within the file");
  const uint64_t data_size = size - header->data_start;
  std::vector<std::pair<uint64_t, uint64_t>> ranges;
  for (const moemesh::SafetensorsEntry& e : header->tensors) {
    Check(e.begin <= e.end && e.end <= data_size, "tensor within the data section");
    // Overflow-checked product (a wrapped count must not pass for the right one),
    // except that any zero dimension makes the count zero.
    for (int64_t d : e.shape) Check(d >= 0, "non-negative dimension");
    const bool empty = std::find(e.shape.begin(), e.shape.end(), 0) != e.shape.end();
    uint64_t numel = empty ? 0 : 1;
    for (int64_t d : e.shape) {
      if (empty) break;
      Check(!__builtin_mul_overflow(numel, static_cast<uint64_t>(d), &numel), "numel overflow");
    }
    uint64_t nbytes = 0;
    Check(!__builtin_mul_overflow(numel, moemesh::DTypeSize(e.dtype), &nbytes), "nbytes overflow");
    Check(nbytes == e.end - e.begin, "nbytes == numel * dtype size");
    ranges.emplace_back(e.begin, e.end);
  }
  std::sort(ranges.begin(), ranges.end());
  for (size_t i = 1; i < ranges.size(); ++i) {
    Check(ranges[i].first >= ranges[i - 1].second, "tensors do not overlap");
  }
  return 0;
}
