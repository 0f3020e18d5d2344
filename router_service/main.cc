// moemesh_router_service: the router as its own executable (same as `moemesh router`).
#include <string>
#include <vector>

#include "router_service/router_main.h"

int main(int argc, char** argv) {
  return moemesh::RouterMain(std::vector<std::string>(argv + 1, argv + argc));
}
