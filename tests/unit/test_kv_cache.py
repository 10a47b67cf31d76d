"""The paged KV cache's allocation: its shape and zeros, and resident memory only for what is used."""

from __future__ import annotations

import json
import subprocess
import sys
from types import SimpleNamespace

import torch

from lmserve.cache.kv_cache import allocate_kv_caches, bytes_per_block, num_blocks_for_budget


def config() -> SimpleNamespace:  # the fields of a ModelConfig the cache reads
    return SimpleNamespace(num_hidden_layers=3, num_key_value_heads=2, head_dim=16)


def test_caches_are_zeros_of_the_budgeted_shape_and_writable():
    cfg = config()
    blocks = num_blocks_for_budget(cfg, 16, torch.bfloat16, 10 * bytes_per_block(cfg, 16, torch.bfloat16) + 5)
    caches = allocate_kv_caches(cfg, blocks, 16, torch.bfloat16, torch.device("cpu"))
    assert blocks == 10 and len(caches) == 3
    for keys, values in caches:
        for t in (keys, values):
            assert t.shape == (2, 160, 16) and t.dtype == torch.bfloat16 and t.is_contiguous()
            assert torch.count_nonzero(t) == 0
    caches[1][0][1, 17] = 3.0  # each tensor its own memory
    assert caches[1][0][1, 17, 0] == 3.0 and torch.count_nonzero(caches[1][1]) == 0
    assert torch.count_nonzero(caches[0][0]) == torch.count_nonzero(caches[2][0]) == 0


PROBE = """
import json, torch
from lmserve.cache.kv_cache import allocate_kv_caches
from lmserve.memory import resident_bytes
from types import SimpleNamespace
cfg = SimpleNamespace(num_hidden_layers=4, num_key_value_heads=8, head_dim=64)
start = resident_bytes()
caches = allocate_kv_caches(cfg, 1024, 16, torch.float32, torch.device("cpu"))  # 4 x 2 x 32 MiB
allocated = resident_bytes()
for keys, values in caches:  # a quarter of the blocks written
    keys[:, :4096] = 1.0
    values[:, :4096] = 1.0
print(json.dumps([allocated - start, resident_bytes() - allocated]))
"""


def test_a_large_budget_costs_resident_memory_only_as_blocks_are_written():
    """A 256 MiB cache adds (nearly) nothing resident until written; writing a quarter of its
    blocks adds a quarter of it."""
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    at_allocation, after_writes = json.loads(done.stdout)
    mib = 2**20
    assert at_allocation < 4 * mib
    assert 60 * mib <= after_writes <= 72 * mib
