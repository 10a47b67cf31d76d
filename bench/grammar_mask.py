"""Cost of constrained decoding per step, against the forward step it rides on.

    .venv/bin/python -m bench.grammar_mask [--batch 1,16,64]

For B sequences decoding under a JSON-schema grammar, times (a) filling the B token masks and
applying them to the logits, and (b) one batched decode step of the default model, and prints
the ratio, for strings of each bound in BOUNDS (none, one regex, chunks then a regex:
lmserve/sampling/bounded_strings.py), the B rows at B different places along a real sentence in
the string. Engine-level, no HTTP; run it on a quiet machine.
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



BOUNDS = {"unbounded string": None, "maxLength 40": 40, "maxLength 1000": 1000}
TEXT = ("The committee reviewed the quarterly report, which describes revenue growth, hiring plans and a "
        "new office in Lisbon; nobody expected numbers this good, and the board asked for a second opinion. ") * 4


def schema(bound: int | None) -> dict:
    name = {"type": "string"} | ({} if bound is None else {"maxLength": bound})
    return {"type": "object", "properties": {"name": name, "tags": {"type": "array", "items": {"type": "string"}}},
            "required": ["name", "tags"]}


def mask_ms(engine: LLMEngine, bound: int | None, batch: int, repeats: int = 20) -> float:
    compiled = engine.grammar.compile(GrammarSpec("json_schema", json.dumps(schema(bound))))
    room = min(bound or len(TEXT), len(TEXT)) - 1
    matchers = {}
    for row in range(batch):  # a prefix of the sentence, cut where one of its tokens ends
        ids = engine.tokenizer.encode('{"name": "' + TEXT[:1 + (row * 37) % room])
        matchers[row] = xgr.GrammarMatcher(compiled)
        assert all(matchers[row].accept_token(token) for token in ids[:-1])
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
    loaded = load_model(default_model_path(), "auto", max_positions=2048)  # what `lmserve serve` runs
    engine = LLMEngine(EngineConfig("default", "bench", cache=CacheConfig(16, 512 << 20),
                                    scheduler=SchedulerConfig(64, 512, 2048)), loaded)
    batches = [int(b) for b in args.batch.split(",")]
    steps = {batch: step_ms(engine, batch) for batch in batches}
    print(f"{'state':>16} {'batch':>5} {'mask ms':>8} {'step ms':>8} {'mask/step':>9}")
    for name, bound in BOUNDS.items():
        for batch in batches:
            mask = mask_ms(engine, bound, batch)
            print(f"{name:>16} {batch:>5} {mask:>8.3f} {steps[batch]:>8.1f} {mask / steps[batch]:>9.1%}")


if __name__ == "__main__":
    main()
