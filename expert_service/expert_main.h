// `moemesh expert [flags]`: parses flags into ExpertServerOptions, serves until
// SIGTERM/SIGINT, then drains and returns 0.
#pragma once

#include <string>
#include <vector>

namespace moemesh {

int ExpertServiceMain(const std::vector<std::string>& args);

}  // namespace moemesh
