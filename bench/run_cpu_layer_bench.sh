#!/usr/bin/env bash
# The CPU MoeLayer benchmark of issue 2, in one command: builds moe_layer_bench (if needed),
# then for each T runs it and the HF-eager PyTorch block (bench/torch_moe_block.py) one after
# the other on the same checkpoint, the same inputs and the same thread count, and prints a
# markdown table of medians with the targets' verdicts. Ratios come from one run; nothing here
# is a timed test.
#
#   bench/run_cpu_layer_bench.sh [--build-dir DIR] [--work-dir DIR] [--threads N]
#                                [--model DIR] [--tokens 1,32,256,1024] [--repeats-scale F]
#
# --work-dir (default ${TMPDIR:-/tmp}/moe_layer_bench) keeps the generated F32 checkpoint
# (H=1024 I=3584 E=8 k=2, ~350 MB), the inputs, both sides' outputs and the JSON lines, so a
# second run skips generation. Repeats per T shrink as T grows (about 2 minutes on 2 cores).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BUILD="$ROOT/build-bench"
WORK="${TMPDIR:-/tmp}/moe_layer_bench"
THREADS=$(nproc)
MODEL=""
TOKENS="1,32,256,1024"
SCALE=1
PY=/usr/bin/python3  # Debian's interpreter: torch + numpy on the system OpenBLAS

while [[ $# -gt 0 ]]; do
  case "$1" in
    --build-dir) BUILD=$2; shift 2 ;;
    --work-dir) WORK=$2; shift 2 ;;
    --threads) THREADS=$2; shift 2 ;;
    --model) MODEL=$2; shift 2 ;;
    --tokens) TOKENS=$2; shift 2 ;;
    --repeats-scale) SCALE=$2; shift 2 ;;
    -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done

if [[ ! -f "$BUILD/build.ninja" ]]; then
  cmake -S "$ROOT" -B "$BUILD" -G Ninja -DMOEMESH_TESTS=OFF -DMOEMESH_CUDA=OFF >/dev/null
fi
ninja -C "$BUILD" moe_layer_bench >/dev/null
BIN="$BUILD/bench/moe_layer_bench"

mkdir -p "$WORK"
MODEL_DIR=${MODEL:-$WORK/model}
OURS="$WORK/ours.jsonl"
THEIRS="$WORK/torch.jsonl"
: >"$OURS"
: >"$THEIRS"
# Both sides use N threads: ours through its ThreadPool (BLAS single-threaded inside its
# tasks), PyTorch through N OpenBLAS threads and N intra-op threads.
export MOEMESH_THREADS=$THREADS
export OPENBLAS_NUM_THREADS=$THREADS
export OMP_NUM_THREADS=$THREADS

repeats_for() {  # fewer repeats where one forward takes longer
  local t=$1 r
  if ((t <= 1)); then r=50; elif ((t <= 32)); then r=30; elif ((t <= 256)); then r=15; else r=7; fi
  awk -v r="$r" -v s="$SCALE" 'BEGIN { n = int(r * s); print (n < 1 ? 1 : n) }'
}

echo "# $(date -u +%FT%TZ) threads=$THREADS loadavg: $(cut -d' ' -f1-3 /proc/loadavg)" >&2
IFS=',' read -ra TS <<<"$TOKENS"
for T in "${TS[@]}"; do
  R=$(repeats_for "$T")
  echo "# T=$T: $R repeats each side" >&2
  model_flag=(--gen-dir "$MODEL_DIR")
  [[ -n "$MODEL" ]] && model_flag=(--model "$MODEL")
  "$BIN" "${model_flag[@]}" --tokens "$T" --repeats "$R" --warmup 2 \
    --input-dir "$WORK/inputs" --output-dir "$WORK/outputs" | tee -a "$OURS" >&2
  "$PY" "$ROOT/bench/torch_moe_block.py" --model "$MODEL_DIR" --tokens "$T" --repeats "$R" \
    --warmup 2 --threads "$THREADS" --input-dir "$WORK/inputs" --output-dir "$WORK/outputs" |
    tee -a "$THEIRS" >&2
done
echo "# done, loadavg: $(cut -d' ' -f1-3 /proc/loadavg)" >&2

"$PY" - "$OURS" "$THEIRS" "$THREADS" <<'EOF'
import json, sys

ours_path, theirs_path, threads = sys.argv[1], sys.argv[2], sys.argv[3]
layer, torch = {}, {}
for line in open(ours_path):
    d = json.loads(line)
    layer[d["T"]] = d
for line in open(theirs_path):
    d = json.loads(line)
    torch[d["T"]] = d

print(f"Threads: {threads} (ours: ThreadPool; PyTorch: torch.set_num_threads({threads}), OpenBLAS {threads}) "
      f"(and a 1-intra-op-thread variant, OpenBLAS still {threads}). Medians.\n")
print("| T | MoeLayer ms | PyTorch HF-eager ms | speed-up (torch/ours) | PyTorch, 1 intra-op "
      "thread ms | speed-up vs faster PyTorch | GEMMs-only ms | layer/GEMMs |")
print("|---:|---:|---:|---:|---:|---:|---:|---:|")
speed_ok, over_ok = True, True
for T in sorted(layer):
    l, t = layer[T], torch[T]
    ours = l["layer_ms_median"]
    th = t["torch_ms_median"]
    t1 = t.get("torch_intra1_ms_median", th)
    best = min(th, t1)
    ratio = l["overhead_ratio"]
    if T >= 256 and best / ours < 1.5:
        speed_ok = False
    if ratio > 1.25:
        over_ok = False
    print(f"| {T} | {ours:.2f} | {th:.2f} | {th / ours:.2f}x | {t1:.2f} | {best / ours:.2f}x | "
          f"{l['gemm_ms_median']:.2f} | {ratio:.3f} |")

print()
print(f"- target speed-up >= 1.5x PyTorch at T >= 256 (vs the faster PyTorch configuration): "
      f"{'PASS' if speed_ok else 'FAIL'}")
print(f"- target layer/GEMMs <= 1.25 at every T: {'PASS' if over_ok else 'FAIL'}")
print(f"- outputs match PyTorch (rel. norm error < 1e-5, same expert choices): "
      f"{'PASS' if all(t.get('topk_ids_match') and t.get('rel_err', 1) < 1e-5 for t in torch.values()) else 'FAIL'}"
      f" (max rel err {max(t.get('rel_err', 1) for t in torch.values()):.2g})")
EOF
