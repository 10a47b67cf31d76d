"""Dequantizing the GGUF block types most files use (Q4_0, Q4_1, Q8_0) in the kernels' one pass, or
torch's vectorized, multi-threaded ops where they are not built: the values are bit for bit the
gguf package's (the same float32 operations in the same order), many times faster.

Q4_0 block: float16 d, then 16 bytes of nibbles; value = (q - 8) * d.
Q4_1 block: float16 d, float16 m, then 16 bytes of nibbles; value = d * q + m.
Q8_0 block: float16 d, then 32 int8 q; value = q * d.
A block's first 16 values are the low nibbles of its bytes, the next 16 the high ones.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from lmserve.kernels import native_module
from lmserve.memory import LOAD_PIECE_BYTES

FAST_TYPES = frozenset({GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1, GGMLQuantizationType.Q8_0})
# Blocks are dequantized a piece at a time (memory.LOAD_PIECE_BYTES of float32 each), so a piece's
# temporaries neither add to the peak nor get faulted in afresh; only the output is the tensor's size.


def dequantize_blocks(data: np.ndarray, qtype: GGMLQuantizationType, native: bool = True) -> np.ndarray:
    """The float32 values of `data`'s blocks (any shape of whole blocks), flat, for a FAST_TYPES
    type: in one pass of the kernels' gguf_dequantize (the same operations, in a fraction of the
    torch ops' time: bench/RESULTS.md, twelfth sitting), or in torch ops where they are not built or `native` is False."""
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    with warnings.catch_warnings():  # a read-only memory map: only read here
        warnings.simplefilter("ignore", UserWarning)
        blocks = torch.from_numpy(np.asarray(data).reshape(-1, type_size))
    module = native_module() if native else None
    if module is not None:
        return module.gguf_dequantize(blocks.contiguous(), int(qtype)).reshape(-1).numpy()
    out = torch.empty((blocks.shape[0], block_size), dtype=torch.float32)
    piece_blocks = max(1, LOAD_PIECE_BYTES // (4 * block_size))
    for start in range(0, blocks.shape[0], piece_blocks):
        piece = slice(start, start + piece_blocks)
        _dequantize_into(out[piece], blocks[piece], qtype)
    return out.reshape(-1).numpy()


def _dequantize_into(out: torch.Tensor, blocks: torch.Tensor, qtype: GGMLQuantizationType) -> None:
    d = _half(blocks, 0)
    if qtype == GGMLQuantizationType.Q8_0:
        torch.mul(blocks[:, 2:].contiguous().view(torch.int8).float(), d, out=out)
        return
    nibbles = blocks[:, 4:] if qtype == GGMLQuantizationType.Q4_1 else blocks[:, 2:]
    halves = out.view(blocks.shape[0], 2, -1)
    halves[:, 0] = nibbles & 0x0F
    halves[:, 1] = nibbles >> 4
    if qtype == GGMLQuantizationType.Q4_1:
        out.mul_(d).add_(_half(blocks, 2))
    else:
        out.sub_(8).mul_(d)


def _half(blocks: torch.Tensor, offset: int) -> torch.Tensor:
    """(n, 1) float32: the float16 at byte `offset` of each block."""
    return blocks[:, offset:offset + 2].contiguous().view(torch.float16).float()
