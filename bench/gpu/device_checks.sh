#!/usr/bin/env bash
# Every check that needs a GPU, in one device call (issues 4 and 6):
#   1. the GPU tests: the CUDA kernels against their CPU references (convert, routing,
#      permute, grouped FFN), the expert service with --device cuda against the CPU one
#      for every family (on one GPU and, where the machine has several, on all of them,
#      with a rebalancing round over NCCL), routing on the GPU (router --device cuda)
#      against the CPU's, UCX with device memory (ucx_device_test) and NCCL copies between
#      the GPUs (nccl_node_test);
#   2. the benchmark: our kernels against Hugging Face's blocks (bench/gpu/run_gpu_bench.sh),
#      table last.
# Prepared here with tools/gpu_bundle.sh (builds and bundles the binaries and their
# gRPC/UCX/abseil libraries into .gpu/); run there from the repository root, carrying
# .gpu:  bench/gpu/device_checks.sh
# Logs go to ${OUT:-/tmp/device_checks}; exit status non-zero if any test or the
# benchmark's correctness checks failed.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
[[ -f .gpu/bundle.tar.xz && ! -d .gpu/bin ]] && tar -C .gpu -xJf .gpu/bundle.tar.xz
export LD_LIBRARY_PATH=$PWD/.gpu/lib:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
export UCX_MODULE_DIR=$PWD/.gpu/lib/ucx
export OUT=${OUT:-/tmp/device_checks}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv,noheader || true

failed=0
for t in cuda_convert_test cuda_routing_test cuda_permute_test cuda_grouped_ffn_test \
         gpu_experts_test gpu_gate_test ucx_device_test nccl_node_test; do
  if [[ ! -x .gpu/bin/$t ]]; then
    echo "$t: MISSING (run tools/gpu_bundle.sh before the call)"
    failed=1
    continue
  fi
  timeout 180 ".gpu/bin/$t" >"$OUT/$t.log" 2>&1
  rc=$?
  summary=$(grep -E '^\[  (PASSED|FAILED|SKIPPED) ' "$OUT/$t.log" | tr '\n' ' ')
  echo "$t: rc=$rc $summary"
  if [[ $rc -ne 0 ]]; then
    failed=1
    grep -E 'Failure|error|Expected|Which is' "$OUT/$t.log" | head -20
  fi
done

bench/gpu/run_gpu_bench.sh --bin-dir .gpu/bin || failed=1
exit $failed
