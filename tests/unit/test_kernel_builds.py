"""The native kernels build for CPUs other than this one's: the AMX tile paths are compiled in only
where the compiler targets AMX, and the rest must build and choose the register kernels without them.
A build for this machine cannot show that, so one is made here with AMX turned off."""

from __future__ import annotations

import subprocess
import sys


def test_the_kernels_build_and_run_without_amx(tmp_path):
    code = f"""
import torch
from torch.utils.cpp_extension import load
from lmserve.kernels import CFLAGS, SOURCES
module = load(name="lmserve_native_no_amx", sources=[str(s) for s in SOURCES],
              extra_cflags=CFLAGS + ["-mno-amx-tile", "-mno-amx-int8", "-mno-amx-bf16", "-O0"],  # -O0: what is compiled in, not how fast
              extra_ldflags=["-fopenmp"], build_directory={str(tmp_path)!r})
print(module.int4_tiles_supported(), module.int4_bf16_tiles_supported(), module.int4_linear_path(100),
      module.int8_linear_path(100, 576))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split()[-4:] == ["False", "False", "registers", "registers"]
