#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The web page's tests drive Debian's chromium through Playwright; Playwright's own browser
# download cannot work on these machines, so the system's package is installed once.
if ! command -v chromium >/dev/null; then
    sudo=$([ "$(id -u)" = 0 ] || echo sudo)
    $sudo apt-get install -y -q chromium >/dev/null 2>&1 || { $sudo apt-get update -q && $sudo apt-get install -y -q chromium; }
fi
# Replicas on Ray Serve are an optional extra (lmserve[ray]); its tests run here too.
.venv/bin/python -c "import ray.serve, psutil" 2>/dev/null || .venv/bin/python -m pip install -q -e ".[ray]"
# Bytecode is cached (in __pycache__, ignored by git) even where the environment turns it off:
# otherwise every run compiles and rewrites the tests' modules again (5 s of collecting here) and
# every server and replica the suite starts compiles lmserve's.
unset PYTHONDONTWRITEBYTECODE
exec .venv/bin/python -m pytest -q "$@"
