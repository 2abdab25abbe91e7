#!/usr/bin/env bash
# Downloads the wheels the GPU machine lacks (it has PyTorch, numpy, scipy, pillow, tqdm but no
# pycolmap/poselib and no internet) into .whl/ (git-ignored), for Python 3.12 on x86-64 Linux.
# Run once on a machine with internet, from the repository root; then see benchmarks/gpu_run.sh.
set -euo pipefail
PY=${PY:-python3}
"$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl pycolmap==4.2.1 poselib==2.0.5
ls -la .whl
