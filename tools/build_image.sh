#!/usr/bin/env bash
# Builds the moemesh image with podman, with no container registry: the Debian 12 base is
# made here with debootstrap from Debian's archive, imported once as localhost/moemesh-debian:12
# and reused; deploy/Containerfile is then built on it and tagged moemesh:VERSION (the
# project version in CMakeLists.txt) and moemesh:latest. Prints the image's size.
#   tools/build_image.sh [--rebuild-base] [--mirror URL]
# Needs root (debootstrap, podman), and network access to the Debian archive (the apt-get
# steps inside the build too). podman runs with deploy/podman/containers.conf.
set -euo pipefail
cd "$(dirname "$0")/.."
mirror=http://deb.debian.org/debian
rebuild_base=0
while [[ $# -gt 0 ]]; do
  case $1 in
    --rebuild-base) rebuild_base=1 ;;
    --mirror) mirror=$2; shift ;;
    *) echo "usage: tools/build_image.sh [--rebuild-base] [--mirror URL]" >&2; exit 2 ;;
  esac
  shift
done
export CONTAINERS_CONF=$PWD/deploy/podman/containers.conf
need=()
for tool in podman debootstrap runc; do command -v "$tool" >/dev/null || need+=("$tool"); done
if [[ ${#need[@]} -gt 0 ]]; then
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q podman buildah runc debootstrap
fi
version=$(sed -n 's/^project(moemesh .*VERSION \([0-9.]*\).*/\1/p' CMakeLists.txt)
base=localhost/moemesh-debian:12

start=$SECONDS
if [[ $rebuild_base == 1 ]] || ! podman image exists "$base"; then
  rootfs=$(mktemp -d)
  trap 'rm -rf "$rootfs"' EXIT
  debootstrap --variant=minbase bookworm "$rootfs" "$mirror" >/dev/null
  tar -C "$rootfs" -c . | podman import --change 'CMD ["/bin/bash"]' - "$base" >/dev/null
  rm -rf "$rootfs"
  trap - EXIT
  echo "base image $base: debootstrap + import in $((SECONDS - start)) s"
fi

start=$SECONDS
podman build --network host --build-arg "BASE=$base" -f deploy/Containerfile \
  -t "moemesh:$version" -t moemesh:latest .
size=$(podman image inspect "moemesh:$version" --format '{{.Size}}')
echo "image moemesh:$version built in $((SECONDS - start)) s: $((size / 1048576)) MiB"
