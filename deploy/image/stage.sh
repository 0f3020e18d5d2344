#!/bin/sh
# The steps both images share (deploy/Containerfile, deploy/Containerfile.cuda), run inside
# their stages, so that the CPU and the CUDA image cannot drift apart:
#   stage.sh build [cuda]     install the build packages, build `moemesh` (and the CUDA
#                             plugin), strip them into /out
#   stage.sh runtime [cuda]   install the libraries the binary (and plugin) load, and copy
#                             into /rootfs only what they load (ldd, UCX's transport
#                             modules), the moemesh user (10001) and /tmp: the final image
#                             is /rootfs on an empty base
set -eu
what=$1
cuda=${2:-}
export DEBIAN_FRONTEND=noninteractive
# No documentation, manuals or translations in either image.
cat > /etc/dpkg/dpkg.cfg.d/01-moemesh-nodoc <<'CFG'
path-exclude=/usr/share/doc/*
path-exclude=/usr/share/man/*
path-exclude=/usr/share/info/*
path-exclude=/usr/share/locale/*
path-exclude=/usr/share/lintian/*
CFG

# Build: compilers and the -dev packages of what CMakeLists.txt finds.
build_pkgs="cmake ninja-build g++ pkg-config binutils libgrpc++-dev protobuf-compiler-grpc
  libprotobuf-dev protobuf-compiler libucx-dev libabsl-dev libcivetweb-dev libopenblas-dev
  nlohmann-json3-dev"
# Runtime: exactly the libraries `ldd moemesh` names outside libc/libstdc++ (their own
# dependencies come with them); tests/image_files_test.sh checks the list against them.
runtime_pkgs="libgrpc++1.51 libgrpc29 libprotobuf32 libabsl20220623 libopenblas0-pthread
  libcivetweb1 libucx0"
cuda_build_pkgs="cuda-nvcc-13-0 cuda-cudart-dev-13-0 libcublas-dev-13-0 libnccl-dev"
cuda_runtime_pkgs="cuda-cudart-13-0 libcublas-13-0 libnccl2"

install() {
  apt-get update
  # shellcheck disable=SC2086
  apt-get install -y --no-install-recommends "$@"
  rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /var/cache/apt/archives/*.deb
}

case "$what" in
  build)
    if [ -n "$cuda" ]; then
      # shellcheck disable=SC2086
      install $build_pkgs $cuda_build_pkgs
      flags="-DMOEMESH_CUDA=ON -DCMAKE_CUDA_COMPILER=/usr/local/cuda-13.0/bin/nvcc"
      targets="moemesh moemesh_cuda"
    else
      # shellcheck disable=SC2086
      install $build_pkgs
      flags="-DMOEMESH_CUDA=OFF"
      targets="moemesh"
    fi
    # shellcheck disable=SC2086
    cmake -S /src -B /src/build -G Ninja -DCMAKE_BUILD_TYPE=Release -DMOEMESH_TESTS=OFF \
      -DMOEMESH_BENCH=OFF $flags
    # shellcheck disable=SC2086
    ninja -C /src/build $targets
    mkdir -p /out/bin /out/lib
    strip -o /out/bin/moemesh /src/build/tools/moemesh
    if [ -n "$cuda" ]; then strip -o /out/lib/libmoemesh_cuda.so /src/build/lib/libmoemesh_cuda.so; fi
    ;;
  runtime)
    if [ -n "$cuda" ]; then
      # shellcheck disable=SC2086
      install $runtime_pkgs $cuda_runtime_pkgs
      bins="/out/bin/moemesh /out/lib/libmoemesh_cuda.so"
    else
      # shellcheck disable=SC2086
      install $runtime_pkgs
      bins=/out/bin/moemesh
    fi
    # Every library the binary (and plugin) link must resolve here, or the image would lack it.
    # shellcheck disable=SC2086
    if ldd $bins | grep 'not found'; then
      echo "stage.sh: unresolved libraries (above)" >&2
      exit 1
    fi
    # UCX opens its transport modules with dlopen: they and their libraries come too (a
    # module whose library is absent, e.g. InfiniBand verbs, is left out; UCX skips it).
    # UCX finds them by their versioned names (libuct_cma.so.0 -> libuct_cma.so.0.0.0).
    mkdir -p /rootfs/tmp /rootfs/etc /rootfs/usr/local/bin /rootfs/usr/local/lib
    chmod 1777 /rootfs/tmp
    for f in $(find /usr/lib/x86_64-linux-gnu/ucx -name '*.so*'); do
      if ldd "$(readlink -f "$f")" | grep -q 'not found'; then continue; fi
      cp -a --parents "$f" /rootfs/
      [ -L "$f" ] || bins="$bins $f"
    done
    # shellcheck disable=SC2086
    for lib in $(ldd $bins | awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// && $1 !~ /:$/ {print $1}' | sort -u); do
      cp -L --parents "$lib" /rootfs/
    done
    printf 'root:x:0:0::/nonexistent:/nonexistent\nmoemesh:x:10001:10001::/nonexistent:/nonexistent\n' >/rootfs/etc/passwd
    printf 'root:x:0:\nmoemesh:x:10001:\n' >/rootfs/etc/group
    ;;
  *)
    echo "usage: stage.sh build|runtime [cuda]" >&2
    exit 2
    ;;
esac
