// `moemesh expert [flags]` and moemesh_expert_service: parses flags into
// ExpertServerOptions, prints "listening on HOST:PORT" once SERVING, serves until
// SIGTERM/SIGINT, then drains in-flight calls and returns 0 (1 on a start-up error).
#pragma once

#include <string>
#include <vector>

namespace moemesh {

// args: the flags, without the program or subcommand name.
int ExpertServiceMain(const std::vector<std::string>& args);

}  // namespace moemesh
