#!/usr/bin/env bash
# Configures and builds MoE Mesh into build/ (Release; CUDA kernels when nvcc exists).
#   tools/build.sh [extra cmake args...]
set -euo pipefail
cd "$(dirname "$0")/.."
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release "$@" >/dev/null
ninja -C build
