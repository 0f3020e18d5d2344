#include "services/model/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <limits>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "nlohmann/json.hpp"
#include "services/base/status_macros.h"

namespace moemesh {
namespace {

using Json = nlohmann::json;

absl::Status Bad(absl::string_view label, absl::string_view what) {
  return absl::InvalidArgumentError(absl::StrCat(label, ": ", what));
}

absl::Status BadTensor(absl::string_view label, absl::string_view tensor, absl::string_view what) {
  return absl::InvalidArgumentError(absl::StrCat(label, ": tensor '", tensor, "': ", what));
}

// Reads a JSON number as a non-negative integer no larger than `limit`.
bool AsCount(const Json& v, uint64_t limit, uint64_t* out) {
  if (v.is_number_unsigned()) {
    *out = v.get<uint64_t>();
  } else if (v.is_number_integer()) {
    const int64_t s = v.get<int64_t>();
    if (s < 0) return false;
    *out = static_cast<uint64_t>(s);
  } else {
    return false;
  }
  return *out <= limit;
}

}  // namespace

absl::StatusOr<SafetensorsHeader> ParseSafetensorsHeader(const uint8_t* bytes, size_t size,
                                                         absl::string_view label) {
  if (size < 8) {
    return Bad(label,
               absl::StrCat("file is ", size, " bytes, shorter than the 8-byte header length"));
  }
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | bytes[i];
  if (n > size - 8) {
    return Bad(label, absl::StrCat("header length ", n, " runs past the end of the file (", size,
                                   " bytes)"));
  }
  if (n > kMaxSafetensorsHeaderBytes) {
    return Bad(label, absl::StrCat("header length ", n, " exceeds the limit of ",
                                   kMaxSafetensorsHeaderBytes, " bytes"));
  }
  const auto* text = reinterpret_cast<const char*>(bytes + 8);
  Json json = Json::parse(text, text + n, /*cb=*/nullptr, /*allow_exceptions=*/false);
  if (json.is_discarded()) return Bad(label, "header is not valid JSON");
  if (!json.is_object()) return Bad(label, "header is not a JSON object");

  SafetensorsHeader header;
  header.data_start = 8 + n;
  const uint64_t data_size = size - header.data_start;
  for (auto it = json.begin(); it != json.end(); ++it) {
    const std::string& name = it.key();
    const Json& v = it.value();
    if (name == "__metadata__") {
      if (!v.is_object()) return Bad(label, "__metadata__ is not an object");
      for (auto m = v.begin(); m != v.end(); ++m) {
        if (!m.value().is_string()) {
          return Bad(label, absl::StrCat("__metadata__ value of '", m.key(), "' is not a string"));
        }
        header.metadata[m.key()] = m.value().get<std::string>();
      }
      continue;
    }
    if (!v.is_object()) return BadTensor(label, name, "entry is not an object");
    SafetensorsEntry e;
    e.name = name;
    const auto dt = v.find("dtype");
    if (dt == v.end() || !dt->is_string()) return BadTensor(label, name, "missing string dtype");
    const auto dtype = DTypeFromName(dt->get<std::string>());
    if (!dtype) {
      return BadTensor(label, name, absl::StrCat("unknown dtype '", dt->get<std::string>(), "'"));
    }
    e.dtype = *dtype;
    const auto sh = v.find("shape");
    if (sh == v.end() || !sh->is_array()) return BadTensor(label, name, "missing shape array");
    // Element count, overflow-checked: it can never exceed the data section anyway.
    uint64_t numel = 1;
    for (const Json& d : *sh) {
      uint64_t dim = 0;
      if (!AsCount(d, std::numeric_limits<int64_t>::max(), &dim)) {
        return BadTensor(label, name, "shape has a negative or non-integer dimension");
      }
      if (dim != 0 && numel > data_size / dim)
        numel = std::numeric_limits<uint64_t>::max();
      else
        numel *= dim;
      e.shape.push_back(static_cast<int64_t>(dim));
    }
    const auto off = v.find("data_offsets");
    if (off == v.end() || !off->is_array() || off->size() != 2) {
      return BadTensor(label, name, "data_offsets must be [begin, end]");
    }
    // Checked before anything dumps them: dump() recurses, and a hostile file can nest
    // arrays deep enough to overflow the stack.
    if (!(*off)[0].is_number_integer() || !(*off)[1].is_number_integer()) {
      return BadTensor(label, name, "data_offsets must be integers");
    }
    if (!AsCount((*off)[0], data_size, &e.begin) || !AsCount((*off)[1], data_size, &e.end)) {
      return BadTensor(label, name,
                       absl::StrCat("data_offsets ", off->dump(),
                                    " fall outside the data section of ", data_size, " bytes"));
    }
    if (e.begin > e.end) {
      return BadTensor(label, name, absl::StrCat("data_offsets ", off->dump(), " are reversed"));
    }
    const uint64_t esize = DTypeSize(e.dtype);
    if (numel == std::numeric_limits<uint64_t>::max() || numel > data_size / esize ||
        numel * esize != e.end - e.begin) {
      return BadTensor(label, name,
                       absl::StrCat(DTypeName(e.dtype), ShapeString(e.shape), " needs ",
                                    numel == std::numeric_limits<uint64_t>::max()
                                        ? std::string("more than the file's")
                                        : absl::StrCat(numel * esize),
                                    " bytes but data_offsets give ", e.end - e.begin));
    }
    header.tensors.push_back(std::move(e));
  }
  // Overlapping tensors would alias each other's bytes: reject them.
  std::vector<const SafetensorsEntry*> by_offset;
  for (const auto& e : header.tensors) by_offset.push_back(&e);
  std::sort(by_offset.begin(), by_offset.end(), [](auto* a, auto* b) {
    return a->begin < b->begin || (a->begin == b->begin && a->end < b->end);
  });
  for (size_t i = 1; i < by_offset.size(); ++i) {
    const auto* prev = by_offset[i - 1];
    const auto* cur = by_offset[i];
    if (cur->begin < prev->end) {
      return BadTensor(label, cur->name,
                       absl::StrCat("bytes [", cur->begin, ", ", cur->end, ") overlap tensor '",
                                    prev->name, "' [", prev->begin, ", ", prev->end, ")"));
    }
  }
  return header;
}

absl::StatusOr<std::unique_ptr<SafetensorsFile>> SafetensorsFile::Open(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    const int err = errno;
    const std::string msg = absl::StrCat(path, ": cannot open: ", std::strerror(err));
    return err == ENOENT ? absl::NotFoundError(msg) : absl::PermissionDeniedError(msg);
  }
  struct stat st {};
  if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    ::close(fd);
    return absl::InvalidArgumentError(absl::StrCat(path, ": not a regular file"));
  }
  const size_t size = static_cast<size_t>(st.st_size);
  void* addr = nullptr;
  if (size > 0) {
    addr = ::mmap(nullptr, size, PROT_READ, MAP_PRIVATE, fd, 0);
    if (addr == MAP_FAILED) {
      const int err = errno;
      ::close(fd);
      return absl::InternalError(absl::StrCat(path, ": mmap failed: ", std::strerror(err)));
    }
  }
  ::close(fd);  // the mapping stays valid
  auto file = std::unique_ptr<SafetensorsFile>(new SafetensorsFile());
  file->path_ = path;
  file->base_ = static_cast<const uint8_t*>(addr);
  file->mapping_ = std::shared_ptr<const void>(addr, [size](const void* p) {
    if (p != nullptr) ::munmap(const_cast<void*>(p), size);
  });
  ASSIGN_OR_RETURN(file->header_, ParseSafetensorsHeader(file->base_, size, path));
  for (size_t i = 0; i < file->header_.tensors.size(); ++i) {
    file->index_.emplace(file->header_.tensors[i].name, i);
  }
  return file;
}

const SafetensorsEntry* SafetensorsFile::Find(absl::string_view name) const {
  auto it = index_.find(name);
  return it == index_.end() ? nullptr : &header_.tensors[it->second];
}

Tensor SafetensorsFile::View(const SafetensorsEntry& e) const {
  return Tensor::View(e.dtype, e.shape, base_ + header_.data_start + e.begin, mapping_);
}

absl::StatusOr<Tensor> SafetensorsFile::Get(absl::string_view name) const {
  const SafetensorsEntry* e = Find(name);
  if (e == nullptr) {
    return absl::NotFoundError(absl::StrCat(path_, ": no tensor '", name, "'"));
  }
  return View(*e);
}

absl::Status WriteSafetensors(const std::string& path,
                              const std::vector<std::pair<std::string, Tensor>>& tensors,
                              const std::map<std::string, std::string>& metadata) {
  Json header = Json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  uint64_t offset = 0;
  for (const auto& [name, t] : tensors) {
    if (name == "__metadata__" || header.contains(name)) {
      return absl::InvalidArgumentError(
          absl::StrCat(path, ": duplicate or reserved tensor name '", name, "'"));
    }
    if (!t.defined()) {
      return absl::InvalidArgumentError(absl::StrCat(path, ": tensor '", name, "' has no data"));
    }
    header[name] = {{"dtype", std::string(DTypeName(t.dtype()))},
                    {"shape", t.shape()},
                    {"data_offsets", {offset, offset + t.nbytes()}}};
    offset += t.nbytes();
  }
  std::string text = header.dump();
  text.resize((text.size() + 7) / 8 * 8, ' ');
  const std::string tmp = path + ".tmp";
  FILE* f = std::fopen(tmp.c_str(), "wb");
  if (f == nullptr) {
    return absl::PermissionDeniedError(
        absl::StrCat(tmp, ": cannot create: ", std::strerror(errno)));
  }
  uint8_t len[8];
  for (int i = 0; i < 8; ++i) len[i] = static_cast<uint8_t>(uint64_t{text.size()} >> (8 * i));
  bool ok =
      std::fwrite(len, 1, 8, f) == 8 && std::fwrite(text.data(), 1, text.size(), f) == text.size();
  for (const auto& [name, t] : tensors) {
    if (!ok) break;
    ok = t.nbytes() == 0 || std::fwrite(t.raw(), 1, t.nbytes(), f) == t.nbytes();
  }
  ok = (std::fclose(f) == 0) && ok;
  if (!ok || std::rename(tmp.c_str(), path.c_str()) != 0) {
    std::remove(tmp.c_str());
    return absl::InternalError(absl::StrCat(path, ": write failed"));
  }
  return absl::OkStatus();
}

}  // namespace moemesh
