#!/usr/bin/env bash
# Checks the Kubernetes manifests: kubectl kustomize renders deploy/k8s and every overlay
# (deploy/k8s-gpu, deploy/k8s-keda, deploy/k8s-prometheus-operator, deploy/k8s-cert-manager)
# and deploy/k8s/prometheus and deploy/k8s/grafana; every rendered object is validated
# offline and strictly (deploy/validate/validate.mjs: the Kubernetes API schema and the KEDA,
# Prometheus Operator and cert-manager CRD schemas, unknown fields and wrong types, probes on
# ports the container does not expose, Services targeting ports their pods lack); then what
# each overlay must carry. TLS: deploy/k8s/make-dev-secrets.sh runs, its Secrets are
# validated and its certificates verified with openssl, and deploy/validate/check_tls.mjs
# checks the manifests against them (every component's TLS and token flags name files of
# those Secrets where they are mounted, HTTP probes, the cert-manager Certificate's names).
# KUBECTL names the kubectl to use (ctest passes the one found at configure time). Without a
# kubectl whose kustomize is v4 or later the check is skipped (exit 77, ctest: skipped);
# without node or deploy/validate/node_modules (tools/install_deps.sh: npm ci) it fails.
set -euo pipefail
cd "$(dirname "$0")/.."
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

fail() {
  echo "error: $*" >&2
  exit 1
}

kubectl=${KUBECTL:-kubectl}
if ! command -v "$kubectl" >/dev/null 2>&1; then
  echo "SKIP: kubectl not found ('$kubectl'); install kubectl (kustomize is built in)"
  exit 77
fi
# kubectl embeds kustomize v4+ from 1.21 on; older ones (Debian 12's kubernetes-client is
# 1.20, kustomize v2.0.3) lack the `labels` field and directory resources used here.
if ! "$kubectl" version --client 2>/dev/null | grep -q 'Kustomize Version: v[4-9]'; then
  echo "SKIP: '$kubectl' embeds no kustomize v4 or later (kubectl >= 1.21 does):" \
       "$("$kubectl" version --client 2>&1 | head -n 1)"
  exit 77
fi
command -v node >/dev/null || fail "node not found (tools/install_deps.sh installs it)"
[[ -d validate/node_modules/kubernetes-models &&
   -d validate/node_modules/@kubernetes-models/cert-manager ]] ||
  fail "deploy/validate/node_modules is missing or stale: run (cd deploy/validate && npm ci)"
command -v openssl >/dev/null || fail "openssl not found (k8s/make-dev-secrets.sh needs it)"

render() {  # render DIR OUT: render, validate
  "$kubectl" kustomize "$1" >"$2" || fail "kubectl kustomize $1 failed"
  node validate/validate.mjs "$2" >/dev/null || fail "$1: the rendered objects are not valid (above)"
  echo "$1: $(grep -c '^kind:' "$2") objects, valid"
}
expect() {  # expect OUT REGEX WHAT
  grep -q -- "$2" "$1" || fail "$1: no $3"
}
reject() {  # reject OUT REGEX WHAT
  ! grep -q -- "$2" "$1" || fail "$1: $3"
}

render k8s "$tmp/mesh.yaml"
expect "$tmp/mesh.yaml" 'name: moemesh-controller$' "controller"
expect "$tmp/mesh.yaml" '^kind: StatefulSet$' "expert StatefulSet"
expect "$tmp/mesh.yaml" '^kind: PodDisruptionBudget$' "PodDisruptionBudget"
expect "$tmp/mesh.yaml" 'fieldPath: status.podIP' "downward-API pod IP for --advertise"
expect "$tmp/mesh.yaml" '\$(POD_IP):8001' "expert --advertise \$(POD_IP)"
expect "$tmp/mesh.yaml" 'moemesh-controller:7000' "--controller for routers and experts"
reject "$tmp/mesh.yaml" 'placement-file\|--experts\|ConfigMap' "a placement or shard list (the controller owns the placement)"
router_replicas=$(awk '/^kind: Deployment/{d=1} d&&/name: moemesh-router$/{r=1} r&&/^  replicas:/{print $2; exit}' "$tmp/mesh.yaml")
((router_replicas >= 2)) || fail "the router Deployment has $router_replicas replicas, want >= 2"

render k8s-gpu "$tmp/gpu.yaml"
expect "$tmp/gpu.yaml" 'image: moemesh-cuda:' "CUDA image for the experts"
expect "$tmp/gpu.yaml" '- --device' "expert --device cuda"
expect "$tmp/gpu.yaml" 'nvidia.com/gpu: 8' "GPU limit"
expect "$tmp/gpu.yaml" 'image: moemesh:' "router and controller on the CPU image"
expect "$tmp/gpu.yaml" '\$(POD_IP):8001' "the base's --advertise"

render k8s-keda "$tmp/keda.yaml"
expect "$tmp/keda.yaml" '^kind: ScaledObject$' "KEDA ScaledObject"
expect "$tmp/keda.yaml" 'moemesh_expert_tokens_total' "the mesh's load as the trigger"

render k8s-prometheus-operator "$tmp/po.yaml"
[[ $(grep -c '^kind: PodMonitor$' "$tmp/po.yaml") == 3 ]] || fail "want 3 PodMonitors"

render k8s/prometheus "$tmp/prometheus.yaml"
expect "$tmp/prometheus.yaml" 'job_name: moemesh-router' "router scrape job"
expect "$tmp/prometheus.yaml" 'alert: MoeMeshHotExpert' "alert rules"

render k8s/grafana "$tmp/grafana.yaml"
expect "$tmp/grafana.yaml" '"uid": "moemesh-overview"' "MoE Mesh dashboard"

render k8s-cert-manager "$tmp/cert-manager.yaml"
[[ $(grep -c '^kind: Certificate$' "$tmp/cert-manager.yaml") == 3 ]] ||
  fail "k8s-cert-manager: want 3 Certificates (the CA's, the mesh's, the client's)"
[[ $(grep -c '^kind: Issuer$' "$tmp/cert-manager.yaml") == 2 ]] || fail "k8s-cert-manager: want 2 Issuers"
expect "$tmp/cert-manager.yaml" '^kind: StatefulSet$' "the base's workloads"

# TLS: the development Secrets are valid objects holding certificates that verify for both
# purposes, and the manifests use them as they should.
KUBECTL=$kubectl k8s/make-dev-secrets.sh --out "$tmp/dev" >"$tmp/secrets.yaml" ||
  fail "k8s/make-dev-secrets.sh failed"
node validate/validate.mjs "$tmp/secrets.yaml" >/dev/null ||
  fail "k8s/make-dev-secrets.sh: its Secrets are not valid (above)"
for purpose in sslserver sslclient; do
  openssl verify -CAfile "$tmp/dev/ca.crt" -purpose "$purpose" "$tmp/dev/tls.crt" >/dev/null ||
    fail "k8s/make-dev-secrets.sh: tls.crt does not verify for $purpose"
done
openssl verify -CAfile "$tmp/dev/ca.crt" -purpose sslclient "$tmp/dev/client.crt" >/dev/null ||
  fail "k8s/make-dev-secrets.sh: client.crt does not verify for sslclient"
cmp -s <(openssl pkey -in "$tmp/dev/tls.key" -pubout) <(openssl x509 -in "$tmp/dev/tls.crt" -noout -pubkey) ||
  fail "k8s/make-dev-secrets.sh: tls.key is not the key of tls.crt"
sans() { openssl x509 -in "$1" -noout -ext subjectAltName | tail -n +2 | tr -d ' '; }
node validate/check_tls.mjs "$tmp/mesh.yaml" "$tmp/secrets.yaml" "$tmp/cert-manager.yaml" \
  "$tmp/dev" "$(sans "$tmp/dev/tls.crt")" "$(sans "$tmp/dev/client.crt")" ||
  fail "the manifests' TLS settings (above)"
KUBECTL=$kubectl k8s/make-dev-secrets.sh --token-only >"$tmp/token.yaml"
[[ $(grep -c '^kind: Secret$' "$tmp/token.yaml") == 1 ]] ||
  fail "k8s/make-dev-secrets.sh --token-only: want one Secret"
expect "$tmp/token.yaml" 'name: moemesh-admin-token$' "admin token Secret"
echo "kubernetes manifests: OK"
