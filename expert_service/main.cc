// moemesh_expert_service: the expert service as its own executable (the same as
// `moemesh expert`), for deployments that ship one binary per service.
#include <string>
#include <vector>

#include "expert_service/expert_main.h"

int main(int argc, char** argv) {
  return moemesh::ExpertServiceMain(std::vector<std::string>(argv + 1, argv + argc));
}
