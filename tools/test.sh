#!/usr/bin/env bash
# Every test: install, build, run ctest; the formatting and lock-annotation checks; the
# parsers and the services' concurrent suites under ASan+UBSan and under TSan; bounded
# libFuzzer runs (ASan+UBSan) of the safetensors header, config.json, the KServe ModelInfer
# decoding and the expert service's request decoding; last, the image (built in the
# background meanwhile) and the manifests run from it with podman. Each stage prints what
# it cost.
#   FUZZ_SECONDS=60 tools/test.sh   # each libFuzzer target's run (default 30 s)
set -euo pipefail
cd "$(dirname "$0")/.."
tools/install_deps.sh
jobs=$(nproc)
# The image is built in the background from the start: most of its time is waiting on the
# Debian archive (debootstrap, apt-get in its stages), which overlaps the stages below. It
# runs at the lowest CPU priority, so that the tests' processes are served first.
image_log=$(mktemp)
nice -n 19 tools/build_image.sh >"$image_log" 2>&1 &
image_pid=$!
trap 'kill "$image_pid" 2>/dev/null || true' EXIT
stage_start=$SECONDS
stage() {  # NAME: ends the stage before (printing its time) and starts the next
  [[ -n "${stage_name:-}" ]] && echo "-- ${stage_name}: $((SECONDS - stage_start)) s"
  stage_name=$1
  stage_start=$SECONDS
  [[ -n "$1" ]] && echo "== $1"
  return 0
}

stage "build and ctest (Release)"
tools/build.sh
ctest --test-dir build --output-on-failure -j "$jobs" -LE image

stage "formatting: clang-format (.clang-format) on every C++ and CUDA source"
find kernels services router_service expert_service tools tests bench \
  \( -name '*.cc' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh' \) -print0 |
  xargs -0 clang-format --dry-run --Werror

stage "lock annotations: every C++ source compiled by clang with -Werror=thread-safety"
CC=clang CXX=clang++ cmake -S . -B build-tsa -G Ninja -DCMAKE_BUILD_TYPE=Debug -DCMAKE_CXX_FLAGS_DEBUG=-O0 \
  -DMOEMESH_THREAD_SAFETY=ON -DMOEMESH_TESTS=OFF -DMOEMESH_BENCH=OFF -DCMAKE_CUDA_HOST_COMPILER=g++ >/dev/null
ninja -C build-tsa $(ninja -C build-tsa -t targets all | grep -E '\.cc\.o:' | cut -d: -f1)

# The concurrent suites: the expert store and server, the router, the UCX transport (over TCP
# and shared memory), the load windows, the metrics, the in-process layer.
concurrent='expert_store_test|expert_server_test|router_test|ucx_transport_test|ucx_transport_shm_test|load_stats_test|metrics_test|moe_layer_test'

stage "ASan + UBSan: parsers, checkpoints, references, the concurrent suites, the mesh end to end"
cmake -S . -B build-asan -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DCMAKE_CXX_FLAGS_RELWITHDEBINFO="-O1 -g1" -DMOEMESH_CUDA=OFF -DMOEMESH_BENCH=OFF \
  -DMOEMESH_SANITIZE=address,undefined >/dev/null
ninja -C build-asan safetensors_test checkpoint_test model_config_test tensor_test fixture_test \
  moe_layer_test expert_store_test expert_server_test router_test ucx_transport_test \
  load_stats_test metrics_test placement_test planner_test mesh_e2e_test moemesh moemesh_expert_service
ASAN_OPTIONS=detect_leaks=1 ctest --test-dir build-asan --output-on-failure -j "$jobs" \
  -R "^(safetensors_test|checkpoint_test|model_config_test|tensor_test|fixture_test|placement_test|planner_test|${concurrent}|mesh_e2e_test)\$"

stage "TSan: the concurrent suites"
cmake -S . -B build-tsan -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DCMAKE_CXX_FLAGS_RELWITHDEBINFO="-O1 -g1" -DMOEMESH_CUDA=OFF -DMOEMESH_BENCH=OFF \
  -DMOEMESH_SANITIZE=thread >/dev/null
ninja -C build-tsan expert_store_test expert_server_test router_test ucx_transport_test \
  load_stats_test metrics_test moe_layer_test moemesh_expert_service
# UCX's memory hooks (libucm) intercept madvise in exiting threads, where TSan's runtime is
# already gone: they are turned off here (the transport registers its buffers explicitly).
# tests/sanitizers/tsan.supp: races reported inside libraries built without TSan;
# ignore_noninstrumented_modules: interceptors (memcpy, ...) called from those libraries are
# not checked at all (each such report, suppressed, cost a symbolized stack: a 9 MB gRPC
# reply took over 15 minutes); accesses from our own, instrumented code still are.
UCX_MEM_EVENTS=no UCX_MEM_MMAP_HOOK_MODE=none UCX_MEM_MALLOC_HOOKS=no \
  TSAN_OPTIONS="halt_on_error=1 ignore_noninstrumented_modules=1 suppressions=$PWD/tests/sanitizers/tsan.supp" \
  ctest --test-dir build-tsan --output-on-failure -j "$jobs" -R "^(${concurrent})\$"

# Each target: its binary in build-fuzz, its corpus under tests/fuzz_corpus, its input size
# limit. They run $jobs at a time, each on a copy of its corpus for FUZZ_SECONDS; a crash
# (an invariant, ASan, UBSan, a leak, a 10 s input) fails the stage once all have run.
fuzz_seconds=${FUZZ_SECONDS:-30}
fuzzers=(
  "services/model/safetensors_header_fuzzer safetensors 4096"
  "services/model/model_config_fuzzer model_config 4096"
  "router_service/kserve_infer_fuzzer kserve_infer 4096"
  "expert_service/expert_request_fuzzer expert_request 4096"
)
stage "libFuzzer (ASan+UBSan): safetensors header, config.json, KServe ModelInfer, expert requests; ${fuzz_seconds} s each, ${jobs} at a time"
CC=clang CXX=clang++ cmake -S . -B build-fuzz -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DMOEMESH_FUZZ=ON -DMOEMESH_CUDA=OFF -DMOEMESH_TESTS=OFF -DMOEMESH_BENCH=OFF \
  -DMOEMESH_SANITIZE=address,undefined >/dev/null
ninja -C build-fuzz $(for f in "${fuzzers[@]}"; do read -r bin _ <<<"$f"; basename "$bin"; done)
fuzz_dir=$(mktemp -d)
mkdir -p build-fuzz/crashes
fuzz() {  # BINARY CORPUS MAX_LEN: one bounded run; its output and exit status go to $fuzz_dir
  mkdir "$fuzz_dir/$2"
  cp tests/fuzz_corpus/"$2"/* "$fuzz_dir/$2"/
  local rc=0
  build-fuzz/"$1" -max_total_time="$fuzz_seconds" -max_len="$3" -timeout=10 \
    -print_final_stats=1 -artifact_prefix="build-fuzz/crashes/$2-" "$fuzz_dir/$2" \
    >"$fuzz_dir/$2.log" 2>&1 || rc=$?
  echo "$rc" >"$fuzz_dir/$2.rc"
}
fuzz_pids=()
for f in "${fuzzers[@]}"; do
  if ((${#fuzz_pids[@]} >= jobs)); then  # not `wait -n`: the image build is a job too
    wait "${fuzz_pids[0]}"
    fuzz_pids=("${fuzz_pids[@]:1}")
  fi
  fuzz $f &
  fuzz_pids+=($!)
done
wait "${fuzz_pids[@]}"
fuzz_failed=()
for f in "${fuzzers[@]}"; do
  read -r _ name _ <<<"$f"
  rc=$(cat "$fuzz_dir/$name.rc")
  echo "[${name}] exit ${rc}"
  if [[ $rc == 0 ]]; then
    grep -E '^(#[0-9]+[[:space:]]+DONE|Done |stat::)' "$fuzz_dir/$name.log" || true
  else
    fuzz_failed+=("$name")
    # From the first report (an invariant, ASan, UBSan, libFuzzer's own) on, else the last
    # lines; awk reads it all (`| head` would end the script early through pipefail).
    awk '/invariant violated|ERROR: |runtime error/ { p = 1 } p && n++ < 80
         { last[NR % 40] = $0 }
         END { if (!p) for (i = NR - 39; i <= NR; i++) if (i > 0) print last[i % 40] }' \
      "$fuzz_dir/$name.log"
  fi
done
rm -rf "$fuzz_dir"
if ((${#fuzz_failed[@]} > 0)); then
  echo "libFuzzer failed: ${fuzz_failed[*]}; the inputs are in build-fuzz/crashes/" >&2
  exit 1
fi

stage "image: tools/build_image.sh (started first), then the Kubernetes manifests run from it with podman"
image_rc=0
wait "$image_pid" || image_rc=$?
cat "$image_log"
rm -f "$image_log"
if [[ $image_rc != 0 ]]; then
  echo "tools/build_image.sh failed (exit $image_rc)" >&2
  exit 1
fi
ctest --test-dir build --output-on-failure -L image

stage ""
echo "all test stages passed in $SECONDS s"
