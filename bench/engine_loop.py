"""Decode throughput of the engine alone (no HTTP), for comparing engine changes.

    .venv/bin/python -m bench.engine_loop --dtype bfloat16,int8 --batch 1,64 [--profile]
    .venv/bin/python -m bench.engine_loop --dtype int4,int4-python    # native decoder vs Python layers

For each batch size, the dtypes take turns (three rounds) on the default model: B requests with
128-token prompts, 40 greedy tokens each; prints tok/s per round, and with --profile the top ops
of torch.profiler over ten decode steps.

    .venv/bin/python -m bench.engine_loop --dtype int4 --batch 64 --whole-requests 256

instead times whole requests as the server's output tok/s counts them: B requests with distinct
random 128-token prompts (no prefix-cache hits) and 256 tokens out, from the first prefill chunk to
the last token, under the server's default scheduler budget.
"""

from __future__ import annotations

import argparse
import random
import time

import torch

from lmserve.cli import default_model_path
from lmserve.config import CacheConfig, EngineConfig, SchedulerConfig
from lmserve.engine.engine import LLMEngine
from lmserve.request import SamplingParams
from lmserve.weights.load import load_model

PROMPT = list(range(1000, 1128))


def make_engine(variant: str) -> LLMEngine:
    """`variant` is a --dtype, with "-python" appended to run every step's layers in Python."""
    dtype = variant.removesuffix("-python")
    loaded = load_model(default_model_path(), dtype, max_positions=2048)
    if variant.endswith("-python"):
        loaded.model.native = None
    config = EngineConfig("default", "bench", dtype=dtype, cache=CacheConfig(16, 1 << 30),
                          scheduler=SchedulerConfig(64, 512, 2048))
    return LLMEngine(config, loaded)


def decode_tok_s(engine: LLMEngine, batch: int, tag: str) -> float:
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    for i in range(batch):
        engine.add_request(f"{tag}-{i}", PROMPT, params)
    for _ in range(3):  # prefill and warm-up
        engine.step()
    started, steps = time.perf_counter(), 0
    while engine.has_unfinished:
        engine.step()
        steps += 1
    return batch * steps / (time.perf_counter() - started)


def whole_requests_tok_s(engine: LLMEngine, batch: int, max_tokens: int, tag: str) -> float:
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    rng = random.Random(tag)
    for i in range(batch):
        engine.add_request(f"{tag}-{i}", [rng.randrange(1000, 40000) for _ in range(len(PROMPT))], params)
    started = time.perf_counter()
    while engine.has_unfinished:
        engine.step()
    return batch * max_tokens / (time.perf_counter() - started)


def profile(engine: LLMEngine, batch: int) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    for i in range(batch):
        engine.add_request(f"profile-{i}", PROMPT, params)
    for _ in range(5):
        engine.step()
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(10):
            engine.step()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
    while engine.has_unfinished:
        engine.step()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", default="bfloat16,int8")
    parser.add_argument("--batch", default="1,64")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--whole-requests", type=int, metavar="MAX_TOKENS",
                        help="time whole requests of this many output tokens, prefill included")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    engines = {dtype: make_engine(dtype) for dtype in args.dtype.split(",")}
    for batch in (int(b) for b in args.batch.split(",")):
        rounds = {dtype: [] for dtype in engines}
        for r in range(3):
            for dtype, engine in engines.items():
                tag = f"{dtype}-{batch}-{r}"
                rounds[dtype].append(whole_requests_tok_s(engine, batch, args.whole_requests, tag)
                                     if args.whole_requests else decode_tok_s(engine, batch, tag))
        for dtype, values in rounds.items():
            print(f"batch {batch:>3} {dtype:>9}: " + " ".join(f"{v:7.1f}" for v in values) + " tok/s")
            if args.profile:
                profile(engines[dtype], batch)


if __name__ == "__main__":
    main()
