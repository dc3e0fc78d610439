#!/usr/bin/env bash
# Download, on a machine with PyPI, the optional benchmark baselines that the GPU machine cannot
# fetch itself, into wheels/ at the repository root (git-ignored; the device call carries it:
# carry=["wheels"], and benchmarks/gpu_run.sh installs whatever is there).
#   liger-kernel       LigerCrossEntropyLoss (benchmarks/pdl.py) and LigerFusedLinearCrossEntropyLoss
#                      (benchmarks/fused_linear.py)
#   cut-cross-entropy  linear_cross_entropy (benchmarks/fused_linear.py)
# Both are pure-Python wheels (py3-none-any) that need only torch and triton, which a CUDA build of
# torch already brings (torch's CUDA wheels depend on triton), so --no-deps is complete. The target
# Python is the GPU machine's (3.12; a py3-none-any wheel installs on any CPython 3.10+).
# Pinned versions, so that every GPU round measures the same baseline; bump them here.
# Usage (repo root): bash benchmarks/fetch_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p wheels
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp -d wheels \
  liger-kernel==0.8.5 cut-cross-entropy==25.1.1
ls -l wheels
du -sh wheels
