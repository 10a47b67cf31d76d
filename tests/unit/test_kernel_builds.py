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
    # A process group of its own (killed whole below) in this session: a new session would be a
    # scheduler autogroup of its own, with a full share of the CPU whatever its nice value.
    _build = subprocess.Popen([sys.executable, "-c", BUILD, _folder], stdout=_out, stderr=_err,
                              preexec_fn=lambda: (os.nice(19), os.setpgrp()))


@atexit.register
def _cleanup() -> None:  # a run that never reaches the test (-k, -x) leaves no compiler running
    if _build.poll() is None:
        os.killpg(_build.pid, signal.SIGKILL)  # the build's compilers too
        _build.wait()
    shutil.rmtree(_folder, ignore_errors=True)


def test_the_kernels_build_and_run_without_amx():
    assert _build.wait(timeout=900) == 0, open(os.path.join(_folder, "err")).read()[-3000:]
    assert open(os.path.join(_folder, "out")).read().split()[-4:] == ["False", "False", "registers", "registers"]
