// `moemesh router [flags]`: parses flags into RouterOptions / RouterServerOptions, serves
// until SIGTERM/SIGINT, then drains and returns 0.
#pragma once

#include <string>
#include <vector>

namespace moemesh {

int RouterMain(const std::vector<std::string>& args);
extern const char kRouterUsage[];

}  // namespace moemesh
