// `moemesh controller [flags]`: parses flags into ControllerOptions, serves until
// SIGTERM/SIGINT, then stops and returns 0 (1 on a start-up error).
#pragma once

#include <string>
#include <vector>

namespace moemesh {

// args: the flags, without the program or subcommand name.
int ControllerMain(const std::vector<std::string>& args);

}  // namespace moemesh
