"""Native CPU kernels, compiled once per machine with the system's C++ compiler.

`paged_decode_attention()` returns the compiled attention op and `native_module()` the whole
module (also NativeDecoder, the decoder layers of every step with a KV cache, the prompt attention
and the float32, W8A8 and W4A8 products), or None (with one warning) where it cannot be built: the
engine then uses its PyTorch path, which gives the same results more slowly, except that torch's
float32 products round differently (and not alike for a row alone and in a batch), that on a bf16 KV
cache the decode kernel rounds the query to bf16 at any batch size and the PyTorch path only above
FLOAT32_DECODE_SEQS sequences, and that prompt attention over a bf16 or an int8 cache (but on CPUs
with AMX-BF16 tiles only chunks of few rows: prompt_attention_chosen) keeps its softmax weights in
float32 on AVX2 and rounds them to bf16 on AVX512-BF16, where PyTorch's rounds its outputs
(3.2e-3-1.5e-2 apart on the cases of tests/unit/test_prompt_attention.py, the kernel the closer to
float32 in each), as decode rows over a prefix they share with enough others do over that prefix
on AVX512-BF16 (0.7-1.2e-3 from the decode kernel's rows alone on the cases of
tests/unit/test_shared_prefix_decode.py).
`python -m lmserve.kernels` builds ahead of time (scripts/setup.sh does), so a server start
never waits for the compiler. LMSERVE_NATIVE_KERNELS=0 turns the kernels off.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import logging
import os
import platform
from pathlib import Path

import torch

from lmserve.cpu import cpu_flags

log = logging.getLogger(__name__)

SOURCES = [Path(__file__).with_name(name) for name in ("paged_attention.cpp", "decoder.cpp", "int8_linear.cpp", "int4_linear.cpp",
                                                       "sampling.cpp", "prompt_attention.cpp", "f32_linear.cpp",
                                                       "bf16_linear.cpp")]
HEADERS = sorted(Path(__file__).parent.glob("*.h"))  # included by the sources: part of the build key
CFLAGS = ["-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-ffp-contract=off"]
# -fopenmp: at::parallel_for uses both cores; -ffp-contract=off: no fused multiply-adds the ATen
# paths would not make (int8_linear.cpp matches model/weight_formats/int8.py bit for bit)


def build_directory() -> Path:
    """Keyed by source, flags, torch version and this CPU's feature flags (-march=native)."""
    key = hashlib.sha256()
    for source in SOURCES + HEADERS:
        key.update(source.read_bytes())
    key.update(" ".join(CFLAGS).encode())
    key.update(torch.__version__.encode())
    key.update(platform.machine().encode())
    key.update(" ".join(sorted(cpu_flags())).encode())
    root = Path(os.environ.get("LMSERVE_KERNEL_CACHE", Path.home() / ".cache" / "lmserve" / "kernels"))
    return root / key.hexdigest()[:16]


def paged_decode_attention():
    module = native_module()
    return None if module is None else module.paged_decode_attention


@functools.cache
def native_module():
    if os.environ.get("LMSERVE_NATIVE_KERNELS", "1") == "0":
        return None
    try:
        folder = build_directory()
        built = _import_built(folder / "lmserve_native.so")
        if built is not None:
            return built
        from torch.utils.cpp_extension import load

        folder.mkdir(parents=True, exist_ok=True)
        module = load(name="lmserve_native", sources=[str(source) for source in SOURCES], extra_cflags=CFLAGS,
                      extra_ldflags=["-fopenmp"], build_directory=str(folder), verbose=False)
        return module
    except Exception as exc:  # noqa: BLE001 - no compiler, headers or ninja: the PyTorch path serves
        log.warning("native kernels unavailable (%s: %s); using the PyTorch path", type(exc).__name__, exc)
        return None


def _import_built(path: Path):
    """The module built before into its source-keyed folder, imported as is; None if there is none
    or it does not import (a build cut short: `load` then builds it again). torch's `load` would
    import setuptools, distutils and packaging (~90 modules, resident for the server's life:
    bench/RESULTS.md, "Figures the code cites") only to find the build up to date."""
    if not path.is_file():
        return None
    spec = importlib.util.spec_from_file_location("lmserve_native", path)
    try:
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    except ImportError:
        return None
    return module
