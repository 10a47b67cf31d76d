"""Cost of one Sampler call on a decode-sized batch, per batch mix.

    .venv/bin/python -m bench.sampler_step [--rows 64] [--vocab 49152] [--repeats 200] [--threads 1]

Times Sampler()(logits, meta) on random (rows, vocab) logits for a few mixes of SamplingParams
(the fast path's: the mix test_sampler.py uses, all greedy, all plain sampling, penalties; and,
where the sampler has it, llama.cpp's chain) and prints the median and the 10th-90th
percentiles in milliseconds. The global generator is reseeded before each call, so every
call does the same work. Run it on a quiet machine; compare runs on the same one.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from lmserve.request import SamplingParams
from lmserve.sampling.sampler import Sampler, SamplingMetadata

FAST_MIX = [SamplingParams(), SamplingParams(temperature=0.0), SamplingParams(top_p=0.3),
            SamplingParams(top_k=50, seed=1), SamplingParams(min_p=0.1, top_p=0.1, seed=3),
            SamplingParams(temperature=0.9, top_p=0.9, seed=42),
            SamplingParams(temperature=0.7, top_k=20, top_p=0.95, seed=42),
            SamplingParams(temperature=1.2, min_p=0.05, top_p=0.5, seed=7)]
PENALTIES = [SamplingParams(repetition_penalty=1.1, presence_penalty=0.5, frequency_penalty=0.5, top_p=0.9)]


def chain_mix() -> list[SamplingParams]:
    from lmserve.request import DryPenalty, SamplerChain

    return [SamplingParams(top_k=40, top_p=0.95, min_p=0.05, chain=SamplerChain()),
            SamplingParams(chain=SamplerChain(mirostat=2)),
            SamplingParams(top_k=40, chain=SamplerChain(dry=DryPenalty(0.8), xtc_probability=0.5)),
            SamplingParams(chain=SamplerChain(typical_p=0.9, dynatemp_range=0.5))]


def mixes() -> dict[str, list[SamplingParams]]:
    found = {"tests' mix": FAST_MIX, "greedy": [SamplingParams(temperature=0.0)],
             "plain": [SamplingParams()], "penalties": PENALTIES}
    try:
        found["chain"] = chain_mix()
    except ImportError:
        pass  # a sampler without llama.cpp's chain
    return found


def time_mix(params: list[SamplingParams], rows: int, vocab: int, repeats: int) -> list[float]:
    batch = [params[i % len(params)] for i in range(rows)]
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(rows, vocab, generator=g) * 3  # (rows, vocab)
    history = torch.randint(0, vocab, (rows, 600), generator=g).tolist()
    sampler, times = Sampler(), []
    for _ in range(repeats):
        gens = [torch.Generator().manual_seed(p.seed) if p.seed is not None else None for p in batch]
        meta = SamplingMetadata(params=batch, prompt_ids=[h[:500] for h in history],
                                output_ids=[h[500:] for h in history], generators=gens)
        torch.manual_seed(0)  # the same rejection rounds every call
        started = time.perf_counter()
        sampler(logits, meta).token_ids.tolist()
        times.append(time.perf_counter() - started)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--mix", action="append", help="only these mixes (repeatable)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    for name, params in mixes().items():
        if args.mix and name not in args.mix:
            continue
        times = sorted(t * 1e3 for t in time_mix(params, args.rows, args.vocab, args.repeats))
        p10, p90 = times[len(times) // 10], times[len(times) * 9 // 10]
        print(f"{name:12s} median {statistics.median(times):7.2f} ms  (p10 {p10:.2f}, p90 {p90:.2f})")


if __name__ == "__main__":
    main()
