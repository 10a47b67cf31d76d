"""Cost of constrained decoding per step, against the forward step it rides on.

    .venv/bin/python -m bench.grammar_mask [--batch 1,16,64]

For B sequences decoding under a JSON-schema grammar, times (a) filling the B token masks and
applying them to the logits, and (b) one batched decode step of the default model, and prints
the ratio. Engine-level, no HTTP; run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import xgrammar as xgr

from lmserve.cli import default_model_path
from lmserve.config import CacheConfig, EngineConfig, SchedulerConfig
from lmserve.engine.engine import LLMEngine
from lmserve.request import GrammarSpec, SamplingParams
from lmserve.sampling.grammar import GrammarMask
from lmserve.weights.load import load_model

SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 40},
                                           "tags": {"type": "array", "items": {"type": "string"}}},
          "required": ["name", "tags"]}
PREFIX = '{"name": "Ada'  # a state inside a string: the mask allows most of the vocabulary


def mask_ms(engine: LLMEngine, batch: int, repeats: int = 50) -> float:
    compiled = engine.grammar.compile(GrammarSpec("json_schema", json.dumps(SCHEMA)))
    matchers = {}
    for row in range(batch):
        matchers[row] = xgr.GrammarMatcher(compiled)
        assert matchers[row].accept_string(PREFIX)
    vocab_size = engine.grammar.vocab_size
    logits = torch.randn(batch, vocab_size)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        GrammarMask.fill(matchers, batch, vocab_size).apply(logits)
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e3


def step_ms(engine: LLMEngine, batch: int) -> float:
    prompt = engine.tokenizer.encode("Describe a person as JSON.")
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    for i in range(batch):
        engine.add_request(f"bench-{batch}-{i}", prompt, params)
    times = []
    while engine.has_unfinished:
        started = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - started)
    return statistics.median(times[4:]) * 1e3  # decode steps only


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", default="1,16,64")
    args = parser.parse_args()
    loaded = load_model(default_model_path(), max_positions=2048)
    engine = LLMEngine(EngineConfig("default", "bench", cache=CacheConfig(16, 512 << 20),
                                    scheduler=SchedulerConfig(64, 512, 2048)), loaded)
    print(f"{'batch':>5} {'mask ms':>8} {'step ms':>8} {'mask/step':>9}")
    for batch in (int(b) for b in args.batch.split(",")):
        mask, step = mask_ms(engine, batch), step_ms(engine, batch)
        print(f"{batch:>5} {mask:>8.3f} {step:>8.1f} {mask / step:>9.1%}")


if __name__ == "__main__":
    main()
