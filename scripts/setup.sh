#!/usr/bin/env bash
# Install valora and everything its tests need on a fresh machine (Python >= 3.11 with pip).
# Idempotent: re-running installs nothing new.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# The CPU build of PyTorch first: an unpinned torch would pull a multi-GB CUDA build.
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
    "$PY" -m pip install -q "torch==2.13.0"
fi
"$PY" -m pip install -q -e ".[dev]"
# Fashion-MNIST for the adapter-generation data (a Debian package; optional elsewhere).
if command -v apt-get >/dev/null 2>&1 && ! dpkg -s dataset-fashion-mnist >/dev/null 2>&1; then
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist; } \
        >/dev/null 2>&1 || echo "setup: dataset-fashion-mnist not installed (its tests will be skipped)" >&2
fi
