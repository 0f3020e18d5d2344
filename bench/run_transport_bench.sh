#!/usr/bin/env bash
# The UCX data-plane benchmark of issue 6, in one command: for each UCX transport set
# (TCP, then shared memory) it runs UCX's own ucx_perftest (ucp_am_lat, ucp_am_bw) as the
# physical reference, bench/transport_bench (the transport alone: gRPC vs UCX, calls
# alternating; then UCX alone with polling off, --ucx-spin-us 0) and mesh_bench
# --compare-transports (the whole mesh: a gRPC mesh and a UCX mesh side by side), and
# prints a markdown table of the figures and target ratios last.
# Ratios come from one run; nothing here is a timed test.
#
#   bench/run_transport_bench.sh [--build-dir DIR] [--tls "tcp posix,cma,self"]
#                                [--tokens 1,16,256,2048] [--hidden 4096]
#
# T tokens of H bf16 values are T*H*2 bytes per destination (H=4096: 8 KiB at T=1,
# 2 MiB at T=256, 16 MiB at T=2048); perftest runs at those sizes. About 10 minutes on
# 2 cores.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BUILD="$ROOT/build-bench"
TLS_LIST="tcp posix,cma,self"
TOKENS="1,16,256,2048"
HIDDEN=4096
while [[ $# -gt 0 ]]; do
  case "$1" in
    --build-dir) BUILD=$2; shift 2 ;;
    --tls) TLS_LIST=$2; shift 2 ;;
    --tokens) TOKENS=$2; shift 2 ;;
    --hidden) HIDDEN=$2; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
if [[ ! -f "$BUILD/build.ninja" ]]; then
  cmake -S "$ROOT" -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release -DMOEMESH_TESTS=OFF \
        -DMOEMESH_CUDA=OFF >/dev/null
fi
ninja -C "$BUILD" transport_bench mesh_bench moemesh >/dev/null
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT

perftest() {  # TLS TEST SIZE ITERS -> the "Final:" line's fields
  local port=$((20000 + RANDOM % 20000))
  UCX_TLS=$1 ucx_perftest -t "$2" -s "$3" -n "$4" -w 20 -p $port >/dev/null 2>&1 &
  local server=$!
  sleep 1
  UCX_TLS=$1 ucx_perftest 127.0.0.1 -t "$2" -s "$3" -n "$4" -w 20 -p $port -f 2>/dev/null | tail -1
  wait $server || true
}

for tls in $TLS_LIST; do
  echo "== UCX_TLS=$tls" >&2
  {
    IFS=, read -ra ts <<< "$TOKENS"
    for t in "${ts[@]}"; do
      bytes=$((t * HIDDEN * 2))
      iters=$(( bytes >= 1048576 ? 2000 * 1048576 / bytes : 20000 ))
      echo "{\"tls\":\"$tls\",\"T\":$t,\"perftest_am_lat_us\":$(perftest "$tls" ucp_am_lat $bytes $iters | awk '{print $3}'),\"perftest_am_bw_mbs\":$(perftest "$tls" ucp_am_bw $bytes $iters | awk '{print $6}')}"
    done
  } > "$OUT/perftest.$tls.jsonl"
  UCX_TLS=$tls "$BUILD/bench/transport_bench" --tokens "$TOKENS" --hidden "$HIDDEN" | grep '^{' \
    > "$OUT/transport.$tls.jsonl"
  # Round trips of each alone: gRPC with no UCX thread polling beside it (its best case
  # on a small machine), and UCX without polling (--ucx-spin-us 0: every message wakes a
  # sleeping thread).
  UCX_TLS=$tls "$BUILD/bench/transport_bench" --tokens "$TOKENS" --hidden "$HIDDEN" --only grpc \
    --window 0 | grep '^{' > "$OUT/grpconly.$tls.jsonl"
  UCX_TLS=$tls "$BUILD/bench/transport_bench" --tokens "$TOKENS" --hidden "$HIDDEN" --only ucx \
    --ucx-spin-us 0 --window 0 | grep '^{' > "$OUT/nospin.$tls.jsonl"
  UCX_TLS=$tls "$BUILD/bench/mesh_bench" --compare-transports --tokens "$TOKENS" | grep '^{' \
    > "$OUT/mesh.$tls.jsonl"
  cat "$OUT"/*."$tls".jsonl >&2
done

python3 - "$OUT" "$TLS_LIST" <<'PY'
import json, sys, glob, os
out, tls_list = sys.argv[1], sys.argv[2].split()
def load(kind, tls):
    return {r["T"]: r for r in map(json.loads, open(os.path.join(out, f"{kind}.{tls}.jsonl")))}
print("| UCX_TLS | T | bytes/dest | RTT p50 gRPC alone / alternating / UCX (µs) | ratio, lower gRPC / UCX (target ≥3 at T=1) | UCX RTT without polling (µs) | perftest am_lat RTT (µs) | UCX one-way GB/s | perftest am_bw GB/s | UCX / perftest (target ≥0.70 at ≥1 MiB) | mesh ms gRPC / UCX | mesh UCX speed-up |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|")
for tls in tls_list:
    p, t, m, n, g = (load(k, tls) for k in ("perftest", "transport", "mesh", "nospin", "grpconly"))
    for T in sorted(t):
        pt, tt, mm = p.get(T, {}), t[T], m.get(T, {})
        perf_bw = float(pt.get("perftest_am_bw_mbs", "nan")) * 1048576 / 1e9
        lat = float(pt.get("perftest_am_lat_us", "nan")) * 2
        alone = g.get(T, {}).get("grpc_rtt_p50_us", float("nan"))
        grpc = tt["grpc_rtt_p50_us"] if alone != alone else min(alone, tt["grpc_rtt_p50_us"])
        print(f"| {tls} | {T} | {tt['bytes']} | {alone:.0f} / {tt['grpc_rtt_p50_us']:.0f} / {tt['ucx_rtt_p50_us']:.0f} | "
              f"{grpc / tt['ucx_rtt_p50_us']:.2f} | {n.get(T, {}).get('ucx_rtt_p50_us', float('nan')):.0f} | {lat:.0f} | {tt['ucx_bw_gbs']:.2f} | {perf_bw:.2f} | "
              f"{tt['ucx_bw_gbs'] / perf_bw:.2f} | {mm.get('grpc_mesh_ms', float('nan')):.2f} / "
              f"{mm.get('ucx_mesh_ms', float('nan')):.2f} | {mm.get('throughput_ratio_ucx_grpc', float('nan')):.2f} |")
PY
