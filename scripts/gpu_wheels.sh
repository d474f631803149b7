#!/usr/bin/env bash
# Fetch, on a machine with a package index, the wheels a GPU machine without one needs to run
# scripts/bench_gpu.sh: the pure-Python packages diffalign imports that such an image usually lacks, at the
# versions of this checkout's .venv (the ones the test suite ran with). torch, torchvision, tokenizers,
# safetensors, accelerate, huggingface_hub, pyarrow and the other compiled packages are taken from the GPU
# machine's own image: wheels for them are large and must match its CUDA build.
#
#   bash scripts/gpu_wheels.sh                 # -> .whl/ (git-ignored), about 11 MB
#   WHEEL_DIR=/some/where PY_VERSION=3.12 bash scripts/gpu_wheels.sh
#
# On the GPU machine, scripts/bench_gpu.sh installs them from .whl/ into a temporary folder when diffalign's
# imports fail, and puts that folder and the checkout on PYTHONPATH; nothing there is modified.
set -euo pipefail
cd "$(dirname "$0")/.."
WHEEL_DIR="${WHEEL_DIR:-.whl}"
PY_VERSION="${PY_VERSION:-3.12}"            # the GPU image's python (3.12 on the machines lent so far)
PYTHON="${PYTHON:-.venv/bin/python}"
PACKAGES="diffusers peft open_clip_torch ftfy wcwidth datasets dill multiprocess"

pins=$("$PYTHON" - "$PACKAGES" <<'PY'
import sys
from importlib.metadata import PackageNotFoundError, version
out = []
for name in sys.argv[1].split():
    try:
        out.append(f"{name}=={version(name)}")
    except PackageNotFoundError:
        sys.exit(f"{name} is not installed in this environment: install the project first (make install)")
print(" ".join(out))
PY
)
echo "fetching for python $PY_VERSION: $pins"
mkdir -p "$WHEEL_DIR"
rm -f "$WHEEL_DIR"/*.whl
# shellcheck disable=SC2086  # the pins are separate arguments
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version "$PY_VERSION" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$WHEEL_DIR" $pins
ls -1 "$WHEEL_DIR"
du -sh "$WHEEL_DIR"
