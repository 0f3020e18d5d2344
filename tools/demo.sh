#!/usr/bin/env bash
# The main job: install, build, then run MoE Mesh on a generated model (no downloads).
#   tools/demo.sh [moemesh demo flags...]
set -euo pipefail
cd "$(dirname "$0")/.."
tools/install_deps.sh
tools/build.sh
exec build/tools/moemesh demo "$@"
