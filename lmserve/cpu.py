"""This CPU's feature flags, read without importing torch (the benchmark plans servers with them)."""

from __future__ import annotations

import functools


@functools.cache
def cpu_flags() -> frozenset[str]:
    """This CPU's feature flags as /proc/cpuinfo lists them (none where it does not exist)."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return frozenset(next((line for line in cpuinfo if line.startswith("flags")), "").split(":", 1)[-1].split())
    except OSError:
        return frozenset()


def has_int8_dot_products(flags: frozenset[str]) -> bool:
    """AVX512-VNNI or AVX-VNNI: what lmserve's int8 and int4 products are built on."""
    return not flags.isdisjoint({"avx512_vnni", "avx_vnni"})


def has_int4_products(flags: frozenset[str]) -> bool:
    """What lmserve's int4 product (W4A8, kernels/int4_registers.h) runs on: int8 dot products, or
    AVX2 with FMA and F16C (vpmaddubsw in place of vpdpbusd)."""
    return has_int8_dot_products(flags) or {"avx2", "fma", "f16c"} <= flags


def has_bf16_dot_products(flags: frozenset[str]) -> bool:
    """AVX512-BF16 or AMX-BF16: bf16 matmuls without widening each value in software."""
    return not flags.isdisjoint({"avx512_bf16", "amx_bf16"})
