#!/usr/bin/env bash
# Broken manifests fail deploy/validate/validate.mjs: a misspelt field, a wrong type, a
# Service port name its pods lack, a probe on a port the container does not expose, a CRD
# field of the wrong type or misspelt (KEDA's, cert-manager's Certificate and Issuer); and
# the unbroken rendering passes. KUBECTL as for k8s/check.sh
# (exit 77, skipped, without a kubectl whose kustomize is v4 or later).
set -euo pipefail
cd "$(dirname "$0")/.."
kubectl=${KUBECTL:-kubectl}
command -v "$kubectl" >/dev/null 2>&1 || { echo "SKIP: no kubectl"; exit 77; }
"$kubectl" version --client 2>/dev/null | grep -q 'Kustomize Version: v[4-9]' ||
  { echo "SKIP: kubectl without kustomize v4+"; exit 77; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$kubectl" kustomize deploy/k8s >"$tmp/good.yaml"
"$kubectl" kustomize deploy/k8s-keda >"$tmp/keda.yaml"
"$kubectl" kustomize deploy/k8s-cert-manager >"$tmp/cert-manager.yaml"
node deploy/validate/validate.mjs "$tmp/good.yaml" >/dev/null
node deploy/validate/validate.mjs "$tmp/keda.yaml" >/dev/null
node deploy/validate/validate.mjs "$tmp/cert-manager.yaml" >/dev/null

failures=0
broken() {  # broken WHAT FILE SED EXPECTED_MESSAGE
  sed "$3" "$2" >"$tmp/bad.yaml"
  if cmp -s "$2" "$tmp/bad.yaml"; then
    echo "FAIL: $1: the edit changed nothing"; failures=$((failures + 1)); return
  fi
  if out=$(node deploy/validate/validate.mjs "$tmp/bad.yaml" 2>&1); then
    echo "FAIL: $1: accepted"; failures=$((failures + 1)); return
  fi
  if ! grep -q -- "$4" <<<"$out"; then
    echo "FAIL: $1: rejected without naming '$4': $out"; failures=$((failures + 1)); return
  fi
  echo "ok: $1: $(grep -- "$4" <<<"$out" | head -n 1)"
}
broken "misspelt field" "$tmp/good.yaml" 's/terminationGracePeriodSeconds: 120/terminationGracePeriodSecond: 120/' \
  'terminationGracePeriodSecond: unknown field'
broken "wrong type" "$tmp/good.yaml" 's/^  replicas: 2$/  replicas: "2"/' '/spec/replicas type'
broken "wrong port name" "$tmp/good.yaml" 's/targetPort: metrics/targetPort: metric/' \
  'targets metric, which a pod it selects does not expose'
broken "probe on a port not exposed" "$tmp/good.yaml" 's/^            port: metrics$/            port: metric/' \
  'Probe on port metric, which the container does not expose'
broken "CRD field type" "$tmp/keda.yaml" 's/minReplicaCount: 2/minReplicaCount: two/' \
  '/spec/minReplicaCount type'
broken "CRD unknown field" "$tmp/keda.yaml" 's/pollingInterval:/pollingIntervall:/' \
  'pollingIntervall: unknown field'
broken "Certificate unknown field" "$tmp/cert-manager.yaml" 's/^  dnsNames:$/  dnsName:/' \
  'Certificate moemesh-tls: .spec.dnsName: unknown field'
broken "Certificate misspelt nested field" "$tmp/cert-manager.yaml" 's/^    encoding: PKCS8$/    encodng: PKCS8/' \
  '.spec.privateKey.encodng: unknown field'
broken "Certificate field type" "$tmp/cert-manager.yaml" 's/^  isCA: true$/  isCA: "yes"/' \
  'Certificate moemesh-ca: /spec/isCA type'
broken "Issuer unknown field" "$tmp/cert-manager.yaml" 's/^  selfSigned: {}$/  selfsigned: {}/' \
  'Issuer moemesh-selfsigned: .spec.selfsigned: unknown field'
[[ $failures == 0 ]] || { echo "$failures broken manifest(s) not caught"; exit 1; }
echo "validation rejects every broken manifest"
