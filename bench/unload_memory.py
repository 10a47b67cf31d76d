"""Does unloading a model inside the server's process give its memory back?

    .venv/bin/python -m bench.unload_memory [--dtype auto] [--cycles 3]

Prints this process's resident memory with torch imported and no model, then for each cycle:
loaded (the default model behind an AsyncEngine, after one 64-token request) and after
`close()`, a garbage collection and handing freed heap pages back, as the server would do.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import time

import psutil
import torch

from lmserve.cli import default_model_path
from lmserve.config import EngineConfig, SchedulerConfig
from lmserve.engine.async_engine import AsyncEngine
from lmserve.engine.engine import LLMEngine
from lmserve.memory import large_blocks_mapped_apart, return_freed_memory
from lmserve.request import SamplingParams


def resident_mib() -> float:
    return psutil.Process().memory_info().rss / 2**20


def settle() -> None:
    gc.collect()
    return_freed_memory()


async def one_request(engine: AsyncEngine) -> None:
    ids = engine.tokenizer.encode("Name the capital of France.")
    params = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)
    async for _ in engine.generate(f"bench-{time.monotonic_ns()}", ids, params):
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--cycles", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(2)
    settle()
    print(f"no model (torch imported): {resident_mib():.0f} MiB")
    for cycle in range(args.cycles):
        config = EngineConfig(str(default_model_path()), "bench", dtype=args.dtype,
                              scheduler=SchedulerConfig(max_model_len=2048))
        with large_blocks_mapped_apart():
            engine = AsyncEngine(LLMEngine.from_config(config))
        settle()
        asyncio.run(one_request(engine))
        loaded = resident_mib()
        engine.close()
        del engine
        settle()
        print(f"cycle {cycle} ({args.dtype}): loaded {loaded:.0f} MiB, unloaded {resident_mib():.0f} MiB")


if __name__ == "__main__":
    main()
