#!/usr/bin/env bash
# Checks the Prometheus configuration and rules of this folder with promtool:
#   check config (prometheus.yml, prometheus-local.yml), check rules (rules/*.yml),
#   test rules (tests/*.yml: every alert firing and not firing, recorded values).
# PROMTOOL names the promtool to use (ctest passes the one found at configure time).
# Exits non-zero on the first failure.
set -euo pipefail
cd "$(dirname "$0")"
promtool=${PROMTOOL:-promtool}
if ! command -v "$promtool" >/dev/null 2>&1; then
  echo "error: promtool not found ('$promtool'): install Debian's prometheus package" \
       "(tools/install_deps.sh does) and re-run cmake" >&2
  exit 1
fi

check_kubernetes_config() {
  local out
  if out=$("$promtool" check config prometheus.yml 2>&1); then
    echo "$out"
    return 0
  fi
  if ! grep -q "field kubernetes_sd_configs not found" <<<"$out"; then
    echo "$out" >&2
    return 1
  fi
  # Debian builds Prometheus without Kubernetes service discovery, so its promtool rejects
  # kubernetes_sd_configs. Check everything else: the same file with each
  # kubernetes_sd_configs block replaced by a static target (the relabelling, rule files
  # and the rest stay as they are).
  echo "note: $promtool has no Kubernetes service discovery; checking prometheus.yml with" \
       "kubernetes_sd_configs replaced by static targets"
  local tmp
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' RETURN
  ln -s "$PWD/rules" "$tmp/rules"
  awk '
    skipping && match($0, /^ */) && RLENGTH > indent && $0 !~ /^ *$/ { next }
    { skipping = 0 }
    match($0, /^ *kubernetes_sd_configs:/) {
      indent = index($0, "k") - 1
      printf "%*sstatic_configs: [{targets: [\"kubernetes-sd.invalid:80\"]}]\n", indent, ""
      skipping = 1
      next
    }
    { print }
  ' prometheus.yml >"$tmp/prometheus.yml"
  if grep -q "^ *kubernetes_sd_configs:" "$tmp/prometheus.yml" ||
     [[ $(grep -c kubernetes-sd.invalid "$tmp/prometheus.yml") -ne 3 ]]; then
    echo "error: could not replace the kubernetes_sd_configs blocks of prometheus.yml" >&2
    return 1
  fi
  "$promtool" check config "$tmp/prometheus.yml"
}

check_kubernetes_config
"$promtool" check config prometheus-local.yml
"$promtool" check rules rules/*.yml
"$promtool" test rules tests/*.yml
echo "prometheus configuration and rules: OK"
