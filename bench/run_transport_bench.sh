#!/usr/bin/env bash
# The UCX data-plane benchmark of issue 6, in one command: for each UCX transport set
# (TCP, then shared memory) it runs UCX's own ucx_perftest (ucp_am_lat, ucp_am_bw) as the
# physical reference, twice for bandwidth: as perftest runs by default, and with
# endpoints and context as the transport creates them (-e: endpoints that detect a failed
# peer, which UCX 1.13 serves over TCP without zero-copy rendezvous; -I: the wakeup
# feature). Then bench/transport_bench (the transport alone: gRPC vs UCX, calls
# alternating; then each alone, and UCX with polling off, --ucx-spin-us 0) and mesh_bench
# --compare-transports (the whole mesh: a gRPC mesh and a UCX mesh side by side), and
# prints markdown tables of the figures and target ratios last.
# Ratios come from one run; nothing here is a timed test.
#
#   bench/run_transport_bench.sh [--build-dir DIR] [--tls "tcp posix,cma,self"]
#                                [--tokens 1,16,256,2048] [--hidden 4096]
#
# T tokens of H bf16 values are T*H*2 bytes per destination (H=4096: 8 KiB at T=1,
# 2 MiB at T=256, 16 MiB at T=2048); perftest runs at those sizes. About 15 minutes on
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

perftest() {  # TLS TEST SIZE ITERS [FLAGS] -> the "Final:" line's fields ("Failed" if it cannot run)
  local port=$((20000 + RANDOM % 20000))
  UCX_TLS=$1 ucx_perftest -t "$2" -s "$3" -n "$4" -w 20 -p $port ${5:-} >/dev/null 2>&1 &
  local server=$!
  sleep 1
  UCX_TLS=$1 ucx_perftest 127.0.0.1 -t "$2" -s "$3" -n "$4" -w 20 -p $port -f ${5:-} 2>/dev/null | tail -1
  wait $server || true
}
number() { [[ $1 =~ ^[0-9.]+$ ]] && echo "$1" || echo null; }

for tls in $TLS_LIST; do
  echo "== UCX_TLS=$tls" >&2
  {
    IFS=, read -ra ts <<< "$TOKENS"
    for t in "${ts[@]}"; do
      bytes=$((t * HIDDEN * 2))
      iters=$(( bytes >= 1048576 ? 2000 * 1048576 / bytes : 20000 ))
      lat=$(number "$(perftest "$tls" ucp_am_lat $bytes $iters | awk '{print $3}')")
      bw=$(number "$(perftest "$tls" ucp_am_bw $bytes $iters | awk '{print $6}')")
      # The same with endpoints that detect a failed peer (-e) and a context with the
      # wakeup feature (-I), as the transport creates them where UCX can (TCP; UCX 1.13's
      # shared memory cannot, and perftest then fails: null).
      bw_e=$(number "$(perftest "$tls" ucp_am_bw $bytes $iters "-e -I" | awk '{print $6}')")
      echo "{\"tls\":\"$tls\",\"T\":$t,\"perftest_am_lat_us\":$lat,\"perftest_am_bw_mbs\":$bw,\"perftest_e_am_bw_mbs\":$bw_e}"
    done
  } > "$OUT/perftest.$tls.jsonl"
  UCX_TLS=$tls "$BUILD/bench/transport_bench" --tokens "$TOKENS" --hidden "$HIDDEN" | grep '^{' \
    > "$OUT/transport.$tls.jsonl"
  # Each alone: gRPC's round trips with no UCX thread polling beside it (its best case on
  # a small machine); UCX's bandwidth with no gRPC threads beside it (as perftest runs);
  # UCX's round trips without polling (--ucx-spin-us 0: every message wakes a sleeping
  # thread).
  UCX_TLS=$tls "$BUILD/bench/transport_bench" --tokens "$TOKENS" --hidden "$HIDDEN" --only grpc \
    --phases rtt | grep '^{' > "$OUT/grpconly.$tls.jsonl"
  UCX_TLS=$tls "$BUILD/bench/transport_bench" --tokens "$TOKENS" --hidden "$HIDDEN" --only ucx \
    --phases bw | grep '^{' > "$OUT/ucxonly.$tls.jsonl"
  UCX_TLS=$tls "$BUILD/bench/transport_bench" --tokens "$TOKENS" --hidden "$HIDDEN" --only ucx \
    --ucx-spin-us 0 --phases rtt | grep '^{' > "$OUT/nospin.$tls.jsonl"
  UCX_TLS=$tls "$BUILD/bench/mesh_bench" --compare-transports --tokens "$TOKENS" | grep '^{' \
    > "$OUT/mesh.$tls.jsonl"
  cat "$OUT"/*."$tls".jsonl >&2
done

python3 - "$OUT" "$TLS_LIST" <<'PY'
import json, sys, os
out, tls_list = sys.argv[1], sys.argv[2].split()
nan = float("nan")
def load(kind, tls):
    return {r["T"]: r for r in map(json.loads, open(os.path.join(out, f"{kind}.{tls}.jsonl")))}
def gbs(mbs):  # perftest's MB/s are MiB/s
    return nan if mbs is None else float(mbs) * 1048576 / 1e9
data = {tls: {k: load(k, tls) for k in ("perftest", "transport", "mesh", "nospin", "grpconly", "ucxonly")}
        for tls in tls_list}
print("Latency (target: gRPC / UCX ≥ 3 at T=1)\n")
print("| UCX_TLS | T | bytes/dest | RTT p50 gRPC alone / alternating / UCX µs | lower gRPC / UCX | UCX RTT without polling µs | perftest am_lat RTT µs |")
print("|---|---:|---:|---:|---:|---:|---:|")
for tls, d in data.items():
    for T in sorted(d["transport"]):
        tt, pt = d["transport"][T], d["perftest"].get(T, {})
        alone = d["grpconly"].get(T, {}).get("grpc_rtt_p50_us", nan)
        grpc = min(alone, tt["grpc_rtt_p50_us"]) if alone == alone else tt["grpc_rtt_p50_us"]
        lat = pt.get("perftest_am_lat_us")
        print(f"| {tls} | {T} | {tt['bytes']} | {alone:.0f} / {tt['grpc_rtt_p50_us']:.0f} / {tt['ucx_rtt_p50_us']:.0f} | "
              f"{grpc / tt['ucx_rtt_p50_us']:.2f} | {d['nospin'].get(T, {}).get('ucx_rtt_p50_us', nan):.0f} | "
              f"{nan if lat is None else 2 * float(lat):.0f} |")
print("\nBandwidth (target: UCX ≥ 0.70 of perftest at ≥ 1 MiB per destination)\n")
print("| UCX_TLS | T | bytes/dest | UCX GB/s alternating with gRPC / alone | perftest am_bw GB/s | perftest -e -I GB/s (endpoints as the transport's) | UCX alone / perftest | UCX alone / perftest -e -I | gRPC GB/s |")
print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
for tls, d in data.items():
    for T in sorted(d["transport"]):
        tt, pt = d["transport"][T], d["perftest"].get(T, {})
        alone = d["ucxonly"].get(T, {}).get("ucx_bw_gbs", nan)
        p, pe = gbs(pt.get("perftest_am_bw_mbs")), gbs(pt.get("perftest_e_am_bw_mbs"))
        print(f"| {tls} | {T} | {tt['bytes']} | {tt['ucx_bw_gbs']:.2f} / {alone:.2f} | {p:.2f} | {pe:.2f} | "
              f"{alone / p:.2f} | {alone / pe:.2f} | {tt['grpc_bw_gbs']:.2f} |")
print("\nWhole mesh (2 expert services, bf16 wire, alternating calls)\n")
print("| UCX_TLS | T | mesh ms gRPC / UCX | UCX speed-up |")
print("|---|---:|---:|---:|")
for tls, d in data.items():
    for T in sorted(d["mesh"]):
        mm = d["mesh"][T]
        print(f"| {tls} | {T} | {mm.get('grpc_mesh_ms', nan):.2f} / {mm.get('ucx_mesh_ms', nan):.2f} | "
              f"{mm.get('throughput_ratio_ucx_grpc', nan):.2f} |")
PY
