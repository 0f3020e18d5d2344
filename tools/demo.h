// `moemesh demo`: the main job. A placement controller, expert services and a router on
// loopback (each its own process), driven through KServe ModelInfer with every answer
// checked bit for bit against the in-process MoeLayer; --skew adds a skewed run that the
// controller rebalances; --static runs a fixed placement instead of the controller;
// --in-process runs the layers in this process.
#pragma once

#include <string>
#include <vector>

#include "absl/status/status.h"

namespace moemesh {

absl::Status RunDemo(const std::vector<std::string>& argv);

}  // namespace moemesh
