#!/usr/bin/env bash
# Builds the binaries bench/gpu/device_checks.sh runs on a GPU machine and bundles them
# with the shared libraries they need (not CUDA's: the GPU machine has those), stripped
# and packed into .gpu/bundle.tar.xz (~14 MB; unpacked ~70 MB, over the device tool's
# 64 MiB carry), for `carry: [".gpu"]`; device_checks.sh unpacks it there.
#   tools/gpu_bundle.sh [BUILD_DIR]   (default build/, configured as tools/build.sh does)
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD=${1:-build}
[[ -f "$BUILD/build.ninja" ]] || cmake -S . -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release >/dev/null
targets=(cuda_convert_test cuda_routing_test cuda_permute_test cuda_grouped_ffn_test
         gpu_experts_test gpu_gate_test ucx_device_test nccl_node_test moe_gpu_bench moemesh_cuda moemesh)
ninja -C "$BUILD" "${targets[@]}"
rm -rf .gpu
BUNDLE=../shared/tools/gpu-bundle
[[ -x "$BUNDLE" ]] || BUNDLE=/work/shared/tools/gpu-bundle
tests=()
for t in cuda_convert_test cuda_routing_test cuda_permute_test cuda_grouped_ffn_test gpu_experts_test \
         gpu_gate_test ucx_device_test nccl_node_test; do
  tests+=("$(find "$BUILD" -name "$t" -type f -perm -u+x | head -1)")
done
"$BUNDLE" .gpu "${tests[@]}" "$BUILD/bench/moe_gpu_bench" \
  "$BUILD/tools/moemesh" "$BUILD/lib/libmoemesh_cuda.so"  # the plugin beside the binaries
strip --strip-unneeded .gpu/bin/* .gpu/lib/*.so* 2>/dev/null || true
tar -C .gpu -cf - bin lib | xz -T0 -6 > .gpu/bundle.tar.xz
rm -rf .gpu/bin .gpu/lib
du -sh .gpu/bundle.tar.xz
