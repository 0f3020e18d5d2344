// `moemesh placement show|rebalance|drain ENDPOINT --controller H:P`: the operator's view
// of a placement controller (proto/controller.proto).
#pragma once

#include <string>
#include <vector>

namespace moemesh {

// args: everything after `placement`. Prints to stdout; returns the process exit code.
int PlacementCommand(const std::vector<std::string>& args);

}  // namespace moemesh
