#!/usr/bin/env bash
# FlashAttention-4 for a lent GPU machine that cannot reach PyPI and takes at most 64 MiB of files a call.
#
# flash-attn-4 and what it needs beyond a CUDA 13 PyTorch image (the CuTe DSL compiler: 92 MB of wheels) do not fit
# one call beside the working tree, so they travel in parts, one part carried in each of several calls that follow
# each other within the machine's 30 s idle window (e.g. the `collect` calls of a gpu_session.sh round):
#
#   bash benchmarks/fa4_bundle.sh pack            # here: download the wheels, unpack, xz, split into .fa4/x0, x1, ...
#   # each call k (carry [".fa4/xk"]):   mkdir -p /tmp/fa4parts && cp .fa4/xk /tmp/fa4parts/ && ...
#   bash benchmarks/fa4_bundle.sh unpack          # there, after the last part: /tmp/fa4site, and prints PYTHONPATH
#
# Then: export PYTHONPATH=/tmp/site:/tmp/fa4site:/tmp/fa4site/nvidia_cutlass_dsl/dsl_packages:$PWD (the package's
# .pth file does what the last entry does, but --target installs do not read .pth files).
# Measured with flash-attn-4 4.0.0b36 and nvidia-cutlass-dsl 4.8.1 on torch 2.11.0+cu130 (benchmarks/NOTES.md,
# session 10). On a machine of your own: pip install "qwennb[fa4]".
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
FA4=${FA4:-4.0.0b36}
DSL=${DSL:-4.8.1}

case "${1:-}" in
pack)
  w=$(mktemp -d)
  get() { python3 -m pip download -q --pre --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 -d "$w" "$@"; }
  get "flash-attn-4==$FA4" "nvidia-cutlass-dsl==$DSL" "nvidia-cutlass-dsl-libs-base==$DSL" \
    "nvidia-cutlass-dsl-libs-core==$DSL" "nvidia-cutlass-dsl-libs-cu13==$DSL" "apache-tvm-ffi<0.2,>=0.1.11" \
    quack-kernels torch-c-dlpack-ext
  mkdir -p "$w/site"
  for f in "$w"/*.whl; do unzip -q -o "$f" -d "$w/site"; done
  tar -C "$w/site" -cf - . | xz -9 -T2 > "$w/site.tar.xz"
  mkdir -p "$here/.fa4"
  grep -qx '/.fa4/' "$here/.git/info/exclude" 2>/dev/null || echo '/.fa4/' >> "$here/.git/info/exclude"
  rm -f "$here"/.fa4/x*
  split -b 17200000 -d -a 1 "$w/site.tar.xz" "$here/.fa4/x"
  ls -l "$here"/.fa4/
  rm -rf "$w"
  ;;
unpack)
  cat /tmp/fa4parts/x* > /tmp/fa4.tar.xz
  mkdir -p /tmp/fa4site
  tar -C /tmp/fa4site -xJf /tmp/fa4.tar.xz
  echo "PYTHONPATH=/tmp/site:/tmp/fa4site:/tmp/fa4site/nvidia_cutlass_dsl/dsl_packages:$here"
  ;;
*)
  echo "usage: bash benchmarks/fa4_bundle.sh pack|unpack" >&2
  exit 2
  ;;
esac
