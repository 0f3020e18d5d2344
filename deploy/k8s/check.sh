#!/usr/bin/env bash
# Checks the Kubernetes manifests of this folder:
#   - placement.json and expert-shards.env are what gen-placement.sh writes for the
#     arguments recorded in expert-shards.env, and the StatefulSet has one pod per shard;
#   - kubectl kustomize renders deploy/k8s, deploy/k8s-gpu (experts on GPU nodes),
#     deploy/k8s/prometheus and deploy/k8s/grafana,
#     with the generated ConfigMaps referenced under their hashed names.
# KUBECTL names the kubectl to use (ctest passes the one found at configure time). Without
# kubectl the rendering is skipped: exit 77, which ctest reports as skipped.
set -euo pipefail
cd "$(dirname "$0")"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

fail() {
  echo "error: $*" >&2
  exit 1
}

# 1. The placement and the shards agree.
header=$(head -n 1 expert-shards.env)
[[ $header =~ ^\#\ Generated\ by:\ gen-placement\.sh\ ([0-9 -]+)\ \(NAMESPACE=([a-z0-9-]+)\)$ ]] ||
  fail "expert-shards.env does not start with the gen-placement.sh header: $header"
read -r -a gen_args <<<"${BASH_REMATCH[1]}"
OUT_DIR=$tmp NAMESPACE=${BASH_REMATCH[2]} ./gen-placement.sh "${gen_args[@]}"
for f in placement.json expert-shards.env; do
  diff -u "$tmp/$f" "$f" >&2 ||
    fail "$f differs from what gen-placement.sh ${gen_args[*]} writes: re-run it"
done
shards=$(grep -c '^moemesh-expert-[0-9]*=' expert-shards.env)
replicas=$(sed -n 's/^  replicas: \([0-9]*\)$/\1/p' expert.yaml)
[[ $replicas == "$shards" ]] ||
  fail "expert.yaml's StatefulSet has $replicas replicas, expert-shards.env $shards shards"
echo "placement: $(grep -c '"layer"' placement.json) entries over $shards expert pods, consistent"

# 2. The kustomizations render.
kubectl=${KUBECTL:-kubectl}
if ! command -v "$kubectl" >/dev/null 2>&1; then
  echo "SKIP: kubectl not found ('$kubectl'); install kubectl (kustomize is built in) to" \
       "render the manifests"
  exit 77
fi
# kubectl embeds kustomize v4+ from 1.21 on; older ones (Debian 12's kubernetes-client is
# 1.20, kustomize v2.0.3) lack the `labels` field and directory resources used here.
if ! "$kubectl" version --client 2>/dev/null | grep -q 'Kustomize Version: v[4-9]'; then
  echo "SKIP: '$kubectl' embeds no kustomize v4 or later (kubectl >= 1.21 does):" \
       "$("$kubectl" version --client 2>&1 | head -n 1)"
  exit 77
fi
render() {  # render DIR OUT
  "$kubectl" kustomize "$1" >"$2" || fail "kubectl kustomize $1 failed"
  echo "$1: $(grep -c '^kind:' "$2") objects"
}
# Every use of generated ConfigMap NAME must carry the generator's hash suffix.
expect_hashed() {  # expect_hashed OUT NAME MIN_COUNT
  local n
  n=$(grep -c "name: $2-[a-z0-9]\{10\}$" "$1" || true)
  ((n >= $3)) || fail "$1: ConfigMap $2 appears $n times with a hash suffix, want >= $3"
  ! grep -q "name: $2$" "$1" || fail "$1: a reference to ConfigMap $2 lacks the hash suffix"
}
expect() {  # expect OUT REGEX WHAT
  grep -q -- "$2" "$1" || fail "$1: no $3"
}

render . "$tmp/mesh.yaml"
expect "$tmp/mesh.yaml" '^kind: Deployment$' "router Deployment"
expect "$tmp/mesh.yaml" '^kind: StatefulSet$' "expert StatefulSet"
expect "$tmp/mesh.yaml" '^  clusterIP: None$' "headless Service"
expect "$tmp/mesh.yaml" 'app.kubernetes.io/name: moemesh-router' "router pod label"
expect "$tmp/mesh.yaml" 'app.kubernetes.io/name: moemesh-expert' "expert pod label"
expect "$tmp/mesh.yaml" '--placement-file' "router --placement-file"
expect_hashed "$tmp/mesh.yaml" moemesh-placement 2
expect_hashed "$tmp/mesh.yaml" moemesh-expert-shards 2

render ../k8s-gpu "$tmp/gpu.yaml"
expect "$tmp/gpu.yaml" 'image: moemesh-cuda:' "CUDA image for the experts"
expect "$tmp/gpu.yaml" '--device cuda --gpu "$MOEMESH_GPUS"' "expert --device cuda"
expect "$tmp/gpu.yaml" 'nvidia.com/gpu: 8' "GPU limit"
expect "$tmp/gpu.yaml" 'image: moemesh:' "router on the CPU image"
expect_hashed "$tmp/gpu.yaml" moemesh-expert-shards 2

render prometheus "$tmp/prometheus.yaml"
expect "$tmp/prometheus.yaml" 'job_name: moemesh-router' "router scrape job"
expect "$tmp/prometheus.yaml" 'alert: MoeMeshHotExpert' "alert rules"
expect_hashed "$tmp/prometheus.yaml" moemesh-prometheus-config 2
expect_hashed "$tmp/prometheus.yaml" moemesh-prometheus-rules 2

render grafana "$tmp/grafana.yaml"
expect "$tmp/grafana.yaml" '"uid": "moemesh-overview"' "MoE Mesh dashboard"
expect_hashed "$tmp/grafana.yaml" moemesh-grafana-dashboards 2
expect_hashed "$tmp/grafana.yaml" moemesh-grafana-provisioning 2
echo "kubernetes manifests: OK"
