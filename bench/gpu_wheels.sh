#!/bin/bash
# Fetch the Python packages a bare GPU machine lacks (its image has torch, transformers,
# peft, accelerate, pyarrow, xxhash) and unpack them into one folder for PYTHONPATH.
# bitsandbytes keeps only its CUDA 13 and CPU libraries, which keeps the folder near 21 MiB.
# Usage: bench/gpu_wheels.sh TARGET_DIR   (then on the GPU: export PYTHONPATH=TARGET_DIR)
#        bench/gpu_wheels.sh --unsloth TARGET_DIR
#   Unsloth and the TRL and datasets versions it accepts, for bench_train's unsloth variants
#   (put first on the child's PYTHONPATH by bench_train.py --unsloth-site). Its Studio web UI
#   and CLI (83 MiB, never imported) are removed, leaving about 26 MiB.
set -euo pipefail
unsloth=no
if [ "${1:-}" = "--unsloth" ]; then unsloth=yes; shift; fi
target=${1:?usage: gpu_wheels.sh [--unsloth] TARGET_DIR}
tmp=$(mktemp -d)
platforms="--platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64"
# pydantic and its three companions: the trainer's configuration and result models need them and
# the GPU image has none of them.
packages="bitsandbytes==0.50.2 trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 liger-kernel==0.8.5
    pydantic==2.14.3 pydantic-core==2.50.4 annotated-types==0.8.0 typing-inspection==0.4.5"
if [ $unsloth = yes ]; then
  packages="unsloth==2026.10.9 unsloth_zoo==2026.10.9 trl==1.15.0 datasets==4.8.5"
fi
for pkg in $packages; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    $platforms -d "$tmp" "$pkg"
done
mkdir -p "$target"
for w in "$tmp"/*.whl; do (cd "$target" && unzip -q -o "$w"); done
if [ $unsloth = yes ]; then
  rm -rf "$target/studio" "$target/unsloth_cli"
else
  find "$target/bitsandbytes" -name 'libbitsandbytes_*.so' ! -name '*cuda13*' ! -name '*cpu*' -delete
fi
rm -rf "$tmp"
du -sh "$target"
