"""The W4A8 product on its two weight layouts, the packaged model's 120 projections: the blocks
layout (the AMX tiles' and the reference's) and the pairs layout (kernels/int4_registers.h) that
CPUs without those tiles load, both on the register tiles, out of cache as a decode step reads them.

    python -m bench.int4_layouts --rows 1,4,16,64,512

Prints, per step size and round, the best of five passes over all projections for each layout,
the weight bytes read per second and blocks' time / pairs'.
"""

from __future__ import annotations

import argparse
import time
from unittest import mock

import torch

from lmserve.cli import default_model_path
from lmserve.kernels import native_module
from lmserve.model.weight_formats import int4
from lmserve.weights.load import load_model

PROJECTIONS = ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")


def best_pass(project, operands, inputs) -> float:
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for weight, x in zip(operands, inputs):
            project(x, weight)
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="1,4,16,64,512", help="step sizes, comma-separated")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(2)
    module = native_module()
    if module is None or not module.int4_linear_supported():
        raise SystemExit("the W4A8 product needs the native kernels on a CPU with AVX512-VNNI or AVX2")
    with mock.patch.object(int4, "int4_pairs_run", lambda: False):  # the blocks layout, whatever the CPU
        model = load_model(default_model_path(), "int4", max_positions=2048).model
    blocks = [layer.get_submodule(name).storage for layer in model.model.layers for name in PROJECTIONS]
    pairs = [int4.W4A8Pairs.of(storage) for storage in blocks]
    nbytes = sum(p.weight.nbytes for p in pairs)
    for rows in [int(r) for r in args.rows.split(",")]:
        inputs = [torch.randn(rows, b.scales.shape[0] * int4.INT4_GROUP) for b in blocks]
        for _ in range(args.rounds):
            on_blocks = best_pass(lambda x, b: module.int4_linear(x, b.weight, b.scales, b.lows, None, "registers"),
                                  blocks, inputs)
            on_pairs = best_pass(lambda x, p: module.int4_pairs_linear(x, p.weight, None), pairs, inputs)
            print(f"rows {rows:4d}: blocks {on_blocks * 1e3:7.2f} ms ({nbytes / on_blocks / 1e9:4.1f} GB/s), "
                  f"pairs {on_pairs * 1e3:7.2f} ms ({nbytes / on_pairs / 1e9:4.1f} GB/s), "
                  f"{on_blocks / on_pairs:.2f}x", flush=True)


if __name__ == "__main__":
    main()
