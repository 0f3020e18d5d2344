#!/usr/bin/env bash
# Every test: install, build, run ctest; the formatting and lock-annotation checks; then the
# parsers under ASan+UBSan and a bounded libFuzzer run of the safetensors header parser.
#   FUZZ_SECONDS=60 tools/test.sh
set -euo pipefail
cd "$(dirname "$0")/.."
tools/install_deps.sh
jobs=$(nproc)

echo "== build and ctest (Release)"
tools/build.sh
ctest --test-dir build --output-on-failure -j "$jobs"

echo "== formatting: clang-format (.clang-format) on every C++ and CUDA source"
find kernels services router_service expert_service tools tests bench \
  \( -name '*.cc' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh' \) -print0 |
  xargs -0 clang-format --dry-run --Werror

echo "== lock annotations: every C++ source compiled by clang with -Werror=thread-safety"
CC=clang CXX=clang++ cmake -S . -B build-tsa -G Ninja -DCMAKE_BUILD_TYPE=Debug -DCMAKE_CXX_FLAGS_DEBUG=-O0 \
  -DMOEMESH_THREAD_SAFETY=ON -DMOEMESH_TESTS=OFF -DMOEMESH_BENCH=OFF -DCMAKE_CUDA_HOST_COMPILER=g++ >/dev/null
ninja -C build-tsa $(ninja -C build-tsa -t targets all | grep -E '\.cc\.o:' | cut -d: -f1)

echo "== parser, checkpoint and reference tests under ASan + UBSan"
cmake -S . -B build-asan -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DMOEMESH_CUDA=OFF \
  -DMOEMESH_BENCH=OFF -DMOEMESH_SANITIZE=address,undefined >/dev/null
ninja -C build-asan safetensors_test checkpoint_test model_config_test tensor_test fixture_test \
  moe_layer_test
ASAN_OPTIONS=detect_leaks=1 ctest --test-dir build-asan --output-on-failure -j "$jobs" \
  -R '^(safetensors_test|checkpoint_test|model_config_test|tensor_test|fixture_test|moe_layer_test)$'

echo "== libFuzzer: safetensors header parser (${FUZZ_SECONDS:-60} s)"
CC=clang CXX=clang++ cmake -S . -B build-fuzz -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DMOEMESH_FUZZ=ON -DMOEMESH_CUDA=OFF -DMOEMESH_TESTS=OFF -DMOEMESH_BENCH=OFF \
  -DMOEMESH_SANITIZE=address,undefined >/dev/null
ninja -C build-fuzz safetensors_header_fuzzer
corpus=$(mktemp -d)
cp tests/fuzz_corpus/safetensors/* "$corpus"/
build-fuzz/services/model/safetensors_header_fuzzer -max_total_time="${FUZZ_SECONDS:-60}" \
  -max_len=4096 -print_final_stats=1 "$corpus" 2>&1 | tail -n 12
rm -rf "$corpus"
echo "all test stages passed"
