#!/usr/bin/env bash
# Makes the two Secrets the manifests of deploy/k8s mount, for a cluster without
# cert-manager (development, CI, a demo), and prints them as YAML; it touches no cluster:
#   deploy/k8s/make-dev-secrets.sh | kubectl apply -f -
#   moemesh-tls          (type kubernetes.io/tls) tls.crt, tls.key: one certificate every
#                        component serves and dials with, signed by a new CA; ca.crt: that
#                        CA. The same layout cert-manager writes (deploy/k8s-cert-manager).
#   moemesh-admin-token  token: 32 random bytes, hex: the admin bearer token.
# The certificate (EC P-256, server and client authentication, DEV_DAYS days, default 365)
# names mesh.moemesh.internal, the name the components expect when they dial each other
# (--tls-server-name: they dial pods by IP) and the one given the admin identity
# (--admin-san), and the router's and the controller's Service names, for clients that dial
# those.
#
# Options:
#   --namespace NS  the Secrets' namespace and the Service names' (default moemesh)
#   --token-only    only moemesh-admin-token (with deploy/k8s-cert-manager, which writes
#                   moemesh-tls)
#   --out DIR       keep the files in DIR (created): ca.crt, ca.key, tls.crt, tls.key,
#                   token, and client.crt/client.key, a certificate of the same CA naming
#                   client.moemesh.internal only: what a KServe client outside the mesh
#                   presents (the router requires one; it is not given the admin identity).
#                   Without --out they are deleted: keep ca.key to issue more.
# Needs openssl and kubectl (only `kubectl create --dry-run=client`, which needs no cluster).
# Run in CI by deploy/k8s/check.sh, which validates its output and checks the certificates.
set -euo pipefail

namespace=moemesh
token_only=0
out=""
while (($#)); do
  case "$1" in
    --namespace) namespace=${2:?--namespace needs a value}; shift 2 ;;
    --token-only) token_only=1; shift ;;
    --out) out=${2:?--out needs a directory}; shift 2 ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "make-dev-secrets.sh: unknown argument '$1' (--help)" >&2; exit 2 ;;
  esac
done
kubectl=${KUBECTL:-kubectl}
for tool in openssl "$kubectl"; do
  command -v "$tool" >/dev/null || { echo "make-dev-secrets.sh: $tool not found" >&2; exit 1; }
done

if [[ -n $out ]]; then
  mkdir -p "$out"
  dir=$out
else
  dir=$(mktemp -d)
  trap 'rm -rf "$dir"' EXIT
fi
umask 077
days=${DEV_DAYS:-365}
mesh_name=mesh.moemesh.internal

openssl rand -hex 32 >"$dir/token"

if ((!token_only)); then
  quiet() { "$@" 2>"$dir/openssl.log" || { cat "$dir/openssl.log" >&2; exit 1; }; }
  quiet openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
    -keyout "$dir/ca.key" -out "$dir/ca.crt" -days "$days" -subj "/CN=moemesh dev CA" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign"
  issue() {  # issue NAME CN SANS
    printf '%s\n' "subjectAltName = $3" "basicConstraints = critical,CA:FALSE" \
      "keyUsage = critical,digitalSignature" "extendedKeyUsage = serverAuth,clientAuth" \
      >"$dir/$1.ext"
    quiet openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
      -keyout "$dir/$1.key" -out "$dir/$1.csr" -subj "/CN=$2"
    quiet openssl x509 -req -in "$dir/$1.csr" -CA "$dir/ca.crt" -CAkey "$dir/ca.key" \
      -set_serial "0x$(openssl rand -hex 16)" -days "$days" -sha256 \
      -extfile "$dir/$1.ext" -out "$dir/$1.crt"
    rm -f "$dir/$1.csr" "$dir/$1.ext"
  }
  sans="DNS:$mesh_name"
  for service in moemesh-router moemesh-controller; do
    for suffix in "" ".$namespace" ".$namespace.svc" ".$namespace.svc.cluster.local"; do
      sans+=",DNS:$service$suffix"
    done
  done
  issue tls "$mesh_name" "$sans"
  issue client client.moemesh.internal DNS:client.moemesh.internal
  rm -f "$dir/openssl.log"
  "$kubectl" create secret generic moemesh-tls --namespace "$namespace" \
    --type kubernetes.io/tls --from-file=tls.crt="$dir/tls.crt" \
    --from-file=tls.key="$dir/tls.key" --from-file=ca.crt="$dir/ca.crt" \
    --dry-run=client -o yaml
  echo "---"
fi
"$kubectl" create secret generic moemesh-admin-token --namespace "$namespace" \
  --from-file=token="$dir/token" --dry-run=client -o yaml
