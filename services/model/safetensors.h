// The safetensors format: parsing (validated, never trusting the file) and writing.
//
// Layout: u64 little-endian header length N, N bytes of JSON
//   {"name": {"dtype": "BF16", "shape": [..], "data_offsets": [begin, end]}, ...,
//    "__metadata__": {"key": "value"}}
// then the data; offsets are relative to the data's start.
//
// ParseSafetensorsHeader checks everything a hostile file can get wrong: a short file,
// a header length beyond the file, bad JSON, unknown dtypes, negative or overflowing
// shapes, offsets out of range, a byte count that does not match dtype × shape, and
// tensors that overlap. Every error names the file and, where there is one, the tensor.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "kernels/dtype.h"
#include "services/base/tensor.h"

namespace moemesh {

struct SafetensorsEntry {
  std::string name;
  DType dtype = DType::kF32;
  std::vector<int64_t> shape;
  uint64_t begin = 0;  // relative to the data section
  uint64_t end = 0;
};

struct SafetensorsHeader {
  uint64_t data_start = 0;                // absolute offset of the data section: 8 + N
  std::vector<SafetensorsEntry> tensors;  // in header order
  std::map<std::string, std::string> metadata;
};

// Largest header accepted; real checkpoints use well under 1 MiB per shard.
inline constexpr uint64_t kMaxSafetensorsHeaderBytes = 100ull << 20;

// Parses the header of a safetensors file whose first `size` bytes are `bytes` (the
// whole file). `label` (normally the path) names the file in errors.
absl::StatusOr<SafetensorsHeader> ParseSafetensorsHeader(const uint8_t* bytes, size_t size,
                                                         absl::string_view label);

// A memory-mapped safetensors file. Opening touches only the header; a tensor's
// pages are read when its bytes are first used. Thread-safe after Open.
class SafetensorsFile {
 public:
  static absl::StatusOr<std::unique_ptr<SafetensorsFile>> Open(const std::string& path);
  ~SafetensorsFile() = default;

  const std::string& path() const { return path_; }
  const SafetensorsHeader& header() const { return header_; }
  // nullptr when absent.
  const SafetensorsEntry* Find(absl::string_view name) const;
  // Zero-copy view of an entry of this file; keeps the mapping alive.
  Tensor View(const SafetensorsEntry& entry) const;
  // Find + View, or NOT_FOUND naming the file and tensor.
  absl::StatusOr<Tensor> Get(absl::string_view name) const;

 private:
  SafetensorsFile() = default;
  std::string path_;
  std::shared_ptr<const void> mapping_;
  const uint8_t* base_ = nullptr;
  SafetensorsHeader header_;
  std::map<std::string, size_t, std::less<>> index_;
};

// Writes tensors (in the order given) and optional metadata to `path` atomically
// (a temporary file renamed into place).
absl::Status WriteSafetensors(const std::string& path,
                              const std::vector<std::pair<std::string, Tensor>>& tensors,
                              const std::map<std::string, std::string>& metadata = {});

}  // namespace moemesh
