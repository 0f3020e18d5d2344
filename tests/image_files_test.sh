#!/usr/bin/env bash
# The image files stay in step: deploy/Containerfile and deploy/Containerfile.cuda (which
# cannot be built here: no NVIDIA repository) run the same stage steps (deploy/image/
# stage.sh build|runtime) on the same sources, and stage.sh's runtime package list holds the
# package of every library the built `moemesh` needs (readelf NEEDED, resolved with ldd,
# owned per dpkg), so the CPU image's ldd-based copy finds each one.
#   tests/image_files_test.sh BUILD/tools/moemesh
set -euo pipefail
cd "$(dirname "$0")/.."
binary=$1
fail() { echo "error: $*" >&2; exit 1; }

for f in deploy/Containerfile deploy/Containerfile.cuda; do
  grep -q '^RUN stage.sh build' "$f" || fail "$f: no 'RUN stage.sh build'"
  grep -q '^RUN stage.sh runtime' "$f" || fail "$f: no 'RUN stage.sh runtime'"
  grep -q '^FROM scratch$' "$f" || fail "$f: the final stage is not FROM scratch"
done
diff <(grep '^COPY [a-z]' deploy/Containerfile | grep -v stage.sh) \
     <(grep '^COPY [a-z]' deploy/Containerfile.cuda | grep -v stage.sh) >&2 ||
  fail "the two Containerfiles copy different sources into the build"
grep -q 'stage.sh build cuda' deploy/Containerfile.cuda || fail "Containerfile.cuda builds without cuda"

runtime=$(sed -n '/^runtime_pkgs="/,/"$/p' deploy/image/stage.sh | tr -d '"' | sed 's/runtime_pkgs=//')
for lib in $(readelf -d "$binary" | sed -n 's/.*NEEDED.*\[\(.*\)\]/\1/p'); do
  [[ $lib == ld-linux* ]] && continue  # the loader: libc6
  path=$(ldd "$binary" | awk -v l="$lib" '$1 == l {print $3}')
  [[ -n $path ]] || fail "ldd does not resolve $lib"
  # dpkg knows a file by the path its package installed (/lib or /usr/lib: merged /usr).
  pkg=$({ dpkg -S "$path" || dpkg -S "$(readlink -f "$path")" || true; } 2>/dev/null |
        head -n 1 | cut -d: -f1)
  [[ -n $pkg ]] || fail "no package owns $path ($lib)"
  case $pkg in libc6 | libstdc++6 | libgcc-s1) continue ;; esac  # in every Debian base
  grep -qw -- "$pkg" <<<"$runtime" || fail "$lib ($pkg) is not in stage.sh's runtime packages"
done
echo "image files: in step; runtime packages cover every library moemesh needs"
