// Test helper: reads one sample out of a text exposition (Registry::Serialize()).
#pragma once

#include <cmath>
#include <string>

namespace moemesh::metrics {

// The value of the line for `series` exactly as exposed (name{labels} in the registry's
// sorted label order, or the bare name); NaN when there is none.
inline double SampleValue(const std::string& text, const std::string& series) {
  const std::string key = series + " ";
  for (size_t at = text.find(key); at != std::string::npos; at = text.find(key, at + 1)) {
    if (at == 0 || text[at - 1] == '\n') {
      return std::stod(text.substr(at + key.size(), text.find('\n', at) - at - key.size()));
    }
  }
  return std::nan("");
}

}  // namespace moemesh::metrics
