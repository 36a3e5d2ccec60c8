#!/usr/bin/env bash
# Creates .venv with this project's pinned torch and builds ovseg-fast (C++ extension included) into it.
# Used by the README's set-up command and by CI, so the two cannot drift apart.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
python -m pip install --upgrade pip
# torch/torchvision pinned for this project's own environment (the package itself accepts torch>=2.4).
# setuptools, wheel and ninja are the build requirements: the build runs without isolation so that
# the extension is compiled against exactly this torch (see setup.py).
python -m pip install "torch==2.14.1" "torchvision==0.29.1" setuptools wheel ninja
start=$(date +%s)
python -m pip install --no-build-isolation -e ".[dev]"
echo "ovseg-fast: build and install took $(( $(date +%s) - start )) s"
python -m ovseg_fast.info
