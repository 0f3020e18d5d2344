#!/usr/bin/env bash
# Installs the Debian 12 packages MoE Mesh builds and tests with (as root).
# Does nothing when they are all present already.
set -euo pipefail
packages=(
  cmake ninja-build g++ clang libclang-rt-14-dev pkg-config
  libgrpc++-dev protobuf-compiler-grpc libprotobuf-dev protobuf-compiler
  libucx-dev ucx-utils libabsl-dev libgtest-dev libgmock-dev libbenchmark-dev
  libcivetweb-dev libopenblas-dev nlohmann-json3-dev
  prometheus  # promtool and a real Prometheus server for the metrics tests
  podman buildah runc debootstrap  # the image (tools/build_image.sh) and the manifest test
)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "installing: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
# node (Debian's nodejs, unless one is on the PATH) and the schemas the manifest validation
# uses (deploy/validate, from the npm registry, pinned by package-lock.json).
if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends nodejs npm
fi
root=$(cd "$(dirname "$0")/.." && pwd)
stamp=$root/deploy/validate/node_modules/.moemesh-installed-lock
if ! cmp -s "$root/deploy/validate/package-lock.json" "$stamp" 2>/dev/null; then
  (cd "$root/deploy/validate" && npm ci --no-audit --no-fund --loglevel=error)
  cp "$root/deploy/validate/package-lock.json" "$stamp"
fi
