"""The native kernels build for CPUs other than this one's: the AMX tile paths are compiled in only
where the compiler targets AMX, and the rest must build and choose the register kernels without them.
A build for this machine cannot show that, so one is made here with AMX turned off.

The build (about a minute of compiling) starts when this file is collected, at the lowest CPU
priority, so it takes only the time the tests before it leave idle (waiting on servers and
replicas to start); the test waits for it to finish."""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import subprocess
import sys
import tempfile

BUILD = f"""
import os
os.nice(19)  # the compilers it starts inherit it
import torch
from torch.utils.cpp_extension import load
from lmserve.kernels import CFLAGS, SOURCES
module = load(name="lmserve_native_no_amx", sources=[str(s) for s in SOURCES],
              extra_cflags=CFLAGS + ["-mno-amx-tile", "-mno-amx-int8", "-mno-amx-bf16", "-O0"],  # -O0: what is compiled in, not how fast
              extra_ldflags=["-fopenmp"], build_directory=__import__("sys").argv[1])
print(module.int4_tiles_supported(), module.int4_bf16_tiles_supported(), module.int4_linear_path(100),
      module.int8_linear_path(100, 576))
"""

_folder = tempfile.mkdtemp(prefix="lmserve-no-amx-")
with open(os.path.join(_folder, "out"), "w") as _out, open(os.path.join(_folder, "err"), "w") as _err:
    # A process group of its own in this session: a new session would be a scheduler autogroup
    # of its own, with a full share of the CPU whatever its nice value.
    _build = subprocess.Popen([sys.executable, "-c", BUILD, _folder], stdout=_out, stderr=_err, process_group=0)


@atexit.register
def _cleanup() -> None:
    """A run that ends before the build does (-k, -x, Ctrl-C) stops it: SIGTERM first, on which
    ninja stops the compilers it started (each in a process group of their own), then SIGKILL."""
    if _build.poll() is None:
        os.killpg(_build.pid, signal.SIGTERM)
        try:
            _build.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(_build.pid, signal.SIGKILL)
            _build.wait()
    shutil.rmtree(_folder, ignore_errors=True)


def _log(name: str) -> str:
    with open(os.path.join(_folder, name)) as log:
        return log.read()


def test_the_kernels_build_and_run_without_amx():
    assert _build.wait(timeout=900) == 0, _log("err")[-3000:]
    assert _log("out").split()[-4:] == ["False", "False", "registers", "registers"], (_log("out"), _log("err")[-3000:])
