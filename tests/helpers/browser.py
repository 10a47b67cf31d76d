"""The browser the page tests drive: the system's chromium (Playwright's own download cannot
work on the test machines)."""

from __future__ import annotations

import os
import shutil


def chromium_path() -> str:
    """$LMSERVE_CHROMIUM, else chromium on PATH; a missing browser fails the tests that need it."""
    path = os.environ.get("LMSERVE_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        raise RuntimeError("no chromium found: install Debian's chromium package (scripts/setup.sh does) "
                           "or set LMSERVE_CHROMIUM to a Chromium binary")
    return path
