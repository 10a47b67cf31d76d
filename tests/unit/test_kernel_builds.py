"""The native kernels build for CPUs other than this one's: the AMX tile paths are compiled in only
where the compiler targets AMX, and the rest must build and choose the register kernels without them.
A build for this machine cannot show that, so one is made here with AMX turned off, and AVX512-BF16
with it (bf16_linear's branch for CPUs without it).

The build (about a minute of compiling) starts when this file is collected, at the lowest CPU
priority, so it takes only the time the tests before it leave idle (waiting on servers and
replicas to start); the test waits for it to finish. On a CPU with neither AMX nor AVX512-BF16 the
machine's own build is already one without them, and the same checks run on it: a second build
there would only compete with the tests before it (even at the lowest priority it slowed torch's two
threads in the end-to-end tests: bench/RESULTS.md, thirty-eighth sitting)."""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import subprocess
import sys
import tempfile

from lmserve.cpu import cpu_flags

# What the build turns off; a CPU with none of it builds none of it in its own build.
TURNED_OFF = {"amx_tile", "amx_int8", "amx_bf16", "avx512_bf16"}
OWN_BUILD_HAS_NONE = TURNED_OFF.isdisjoint(cpu_flags())

BUILD = """
import os
os.nice(19)  # the compilers it starts inherit it
from torch.utils.cpp_extension import load
from lmserve.kernels import CFLAGS, SOURCES
module = load(name="lmserve_native_no_amx", sources=[str(s) for s in SOURCES],
              # -O0: what is compiled in, not how fast
              extra_cflags=CFLAGS + ["-mno-amx-tile", "-mno-amx-int8", "-mno-amx-bf16", "-mno-avx512bf16", "-O0"],
              extra_ldflags=["-fopenmp"], build_directory=__import__("sys").argv[1])
"""
OWN_BUILD = """
from lmserve.kernels import native_module
module = native_module()
"""
CHECKS = """
import torch
print(module.int4_tiles_supported(), module.int4_bf16_tiles_supported(), module.int4_linear_path(100),
      module.int8_linear_path(100, 576))
# bf16_linear without bf16 dot products: the panels unpacked, the product in float32
w, x, b = torch.randn(40, 33).bfloat16(), torch.randn(3, 33), torch.randn(40)
panels = module.bf16_panels(w)
exact = torch.nn.functional.linear(x.bfloat16().double(), w.double(), b.double())
print(module.bf16_linear_supported(), (module.bf16_linear(x, panels, b, 40).double() - exact).abs().max().item() < 1e-4,
      torch.equal(module.bf16_panel_rows(panels, torch.tensor([0, 39]), 40, 33), w[[0, 39]].float()))
"""

_folder = tempfile.mkdtemp(prefix="lmserve-no-amx-")
with open(os.path.join(_folder, "out"), "w") as _out, open(os.path.join(_folder, "err"), "w") as _err:
    # A process group of its own in this session: a new session would be a scheduler autogroup
    # of its own, with a full share of the CPU whatever its nice value.
    _build = subprocess.Popen([sys.executable, "-c", (OWN_BUILD if OWN_BUILD_HAS_NONE else BUILD) + CHECKS, _folder],
                              stdout=_out, stderr=_err, process_group=0)


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
    out = _log("out").split()
    assert out[-7:-3] == ["False", "False", "registers", "registers"], (out, _log("err")[-3000:])
    # and without AVX512-BF16 (turned off too): bf16_linear's other branch gives the same products
    assert out[-3:] == ["False", "True", "True"], (out, _log("err")[-3000:])
