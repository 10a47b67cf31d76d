#!/usr/bin/env bash
# Set up (if needed) and serve the default model on 127.0.0.1:8080. Extra arguments go to
# `lmserve serve`, e.g. scripts/serve.sh --port 9000 or scripts/serve.sh /path/to/model.gguf
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/lmserve serve "$@"
