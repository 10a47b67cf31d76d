"""Engine-alone timings behind figures in bench/RESULTS.md (no HTTP), on the default model, int4,
2 threads:

    .venv/bin/python -m bench.engine_steps costly     # ms per step of 16 rows: stop strings, logit_bias
    .venv/bin/python -m bench.engine_steps chunk      # ms for a prompt tail of N tokens over 192 cached, and a decode
    .venv/bin/python -m bench.engine_steps lookup     # tok/s of one request with prompt lookup off and on
    .venv/bin/python -m bench.engine_steps lookup-matrix  # off and on across texts, decodings, 1 and 4 at once
    .venv/bin/python -m bench.engine_steps forced     # tok/s of one request under a JSON schema, drafts of each kind
    .venv/bin/python -m bench.engine_steps lookup-busy [--levels 16,32,64] [--loops]  # off and on, C at once, requests admitted as others finish
    .venv/bin/python -m bench.engine_steps decode [--levels 1x128,64x1024,64x128-384,64x1024+64] [--scattered]  # sequences decoding at once
    .venv/bin/python -m bench.engine_steps prefill    # one prompt of 128-2,000 tokens: tok/s, and attention's share; --kv-cache-dtype int8 for that cache
"""

from __future__ import annotations

import argparse
import json
import random
import time

import torch

from lmserve.cli import default_model_path
from lmserve.config import CacheConfig, EngineConfig, SchedulerConfig
from lmserve.engine.engine import LLMEngine
from lmserve.request import GrammarSpec, SamplingParams
from lmserve.weights.load import load_model

PROMPT = list(range(1000, 1128))
REWRITE = ("Rewrite the following paragraph, fixing only the spelling mistakes and keeping everything else the "
           "same:\n\nThe quick brown fox jumpd over the lazy dog. The dog was not amused, and it barkd at the fox "
           "for a long time. Later that day, the fox came back and jumpd over the dog again, because foxes like to "
           "jump over dogs when they are bored. The dog, still not amused, decided to sleep insted.")
STORY = "Write a short story about a robot who learns to paint."
QUESTIONS = ("What are the main causes of climate change, and what can one person do about it?",
             "Explain how a hash table works to a new programmer.",
             "Give me three ideas for a weekend trip with children, with a packing list for each.",
             "Write a Python function that checks whether a string is a palindrome, and explain it.")
EXTRACT = ("Extract the order as JSON. Order from Jane Doe (jane.doe@example.com, +44 20 7946 0958): 2 x SKU A-100 "
           "at 9.99 each, 1 x SKU B-220 at 24.50. Ship express to 10 Downing Street, London, SW1A 2AA, United "
           "Kingdom. Gift wrap please.")
ORDER_SCHEMA = {"type": "object", "required": ["customer", "items", "shipping_address", "priority", "gift_wrap"],
                "properties": {
    "customer": {"type": "object", "required": ["name", "email", "phone"], "properties": {
        "name": {"type": "string", "maxLength": 40}, "email": {"type": "string", "maxLength": 40},
        "phone": {"type": "string", "maxLength": 20}}},
    "items": {"type": "array", "maxItems": 4, "items": {"type": "object", "required": ["sku", "quantity", "unit_price"],
              "properties": {"sku": {"type": "string", "maxLength": 12}, "quantity": {"type": "integer"},
                             "unit_price": {"type": "number"}}}},
    "shipping_address": {"type": "object", "required": ["street", "city", "postal_code", "country"], "properties": {
        "street": {"type": "string", "maxLength": 40}, "city": {"type": "string", "maxLength": 24},
        "postal_code": {"type": "string", "maxLength": 10}, "country": {"type": "string", "maxLength": 24}}},
    "priority": {"type": "string", "enum": ["standard", "express", "overnight"]},
    "gift_wrap": {"type": "boolean"}}}
REPEATS = 5
DECODE_STEPS = 32
BLOCK_SIZE = 16  # the engines' KV blocks, in tokens
DECODE_LEVELS = "1x128,32x128,64x128,64x1024"  # sequences x prompt tokens
BUSY_LEVELS = "16,32,64"  # lookup-busy: requests at once
DECODINGS = {"greedy": dict(temperature=0), "t0.7/p0.9": dict(temperature=0.7, top_p=0.9),
             "t1.0": dict(temperature=1.0)}


KV_CACHE_DTYPE = ["auto"]  # --kv-cache-dtype, for every engine a run builds


def engine(loaded, speculative: int = 0, kv_cache_bytes: int = 1 << 30) -> LLMEngine:
    cache = CacheConfig(BLOCK_SIZE, kv_cache_bytes, kv_cache_dtype=KV_CACHE_DTYPE[0])
    return LLMEngine(EngineConfig("default", "bench", dtype="int4", cache=cache,
                                  scheduler=SchedulerConfig(64, 512, 2048, num_speculative_tokens=speculative)),
                     loaded)


def costly(loaded) -> None:
    """16 rows, temperature 1, 64 tokens: plain, 256 stop strings, 1,024 biases, both; two rounds."""
    e = engine(loaded)
    stops = tuple(f"stop marker {i:04d}" for i in range(256))
    bias = tuple((t, -1.0) for t in range(1000, 2024))
    base = dict(temperature=1.0, max_tokens=64, ignore_eos=True, seed=1)
    variants = {"plain": SamplingParams(**base), "stops": SamplingParams(**base, stop=stops),
                "bias": SamplingParams(**base, logit_bias=bias),
                "both": SamplingParams(**base, stop=stops, logit_bias=bias)}
    for round_ in range(2):
        for name, params in variants.items():
            for i in range(16):
                e.add_request(f"{name}-{round_}-{i}", PROMPT, params)
            e.step(), e.step()  # the prompts
            started, steps = time.perf_counter(), 0
            while e.has_unfinished:
                e.step()
                steps += 1
            print(f"round {round_} {name:>5}: {(time.perf_counter() - started) / steps * 1000:6.1f} ms/step")


def chunk(loaded) -> None:
    """One step of N tokens after 192 cached ones (a prompt's tail: the prefill path), then decodes."""
    e = engine(loaded)
    base = [1000 + (j * 7) % 30000 for j in range(192)]
    once = SamplingParams(temperature=0, max_tokens=1)
    e.generate([base], once)
    for extra in (1, 2, 3, 5, 9, 17):
        times = []
        for r in range(8):
            e.add_request(f"c{extra}-{r}", base + [2000 + r * 31 + i for i in range(extra)], once)
            started = time.perf_counter()
            e.step()
            times.append(time.perf_counter() - started)
            while e.has_unfinished:
                e.step()
        print(f"{extra:3d} tokens over 192 cached: {sorted(times)[len(times) // 2] * 1000:6.2f} ms")
    e.add_request("decode", base + [5, 6, 7], SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))
    e.step(), e.step()
    times = []
    for _ in range(30):
        started = time.perf_counter()
        e.step()
        times.append(time.perf_counter() - started)
    print(f"a decode step at that context: {sorted(times)[len(times) // 2] * 1000:.2f} ms")


def lookup(loaded) -> None:
    """One greedy request at a time, prompt cached, best of 3, with --speculative-ngram 0, 4 and 8."""
    from tests.helpers.real_engine import chat_ids

    for name, text in (("rewrite", REWRITE), ("story", STORY)):
        ids = chat_ids(loaded.tokenizer, text)
        params = SamplingParams(temperature=0, max_tokens=128)
        for k in (0, 4, 8):
            e = engine(loaded, k)
            e.generate([ids], params)
            best, out = float("inf"), []
            for _ in range(3):
                started = time.perf_counter()
                out = e.generate([ids], params)[0]
                best = min(best, time.perf_counter() - started)
            print(f"{name:8s} K={k}: {len(out)} tokens, {len(out) / best:6.1f} tok/s, "
                  f"drafts kept {e.num_accepted_tokens} of {e.num_draft_tokens}")


def forced(loaded) -> None:
    """One greedy request at a time under a JSON schema, prompt cached, best of 3: with no drafts,
    with prompt lookup's alone, and with the text the grammar forces drafted first (serve's
    default), K = 4; steps, and drafts kept. An order to extract (many keys) and the json
    workload's record (bench/workloads.py: long strings, few keys)."""
    from bench.workloads import JSON_SCHEMA
    from tests.helpers.real_engine import chat_ids

    ids = chat_ids(loaded.tokenizer, EXTRACT)
    for name, schema in (("order", ORDER_SCHEMA), ("record", JSON_SCHEMA)):
        params = SamplingParams(temperature=0, max_tokens=400, grammar=GrammarSpec("json_schema", json.dumps(schema)))
        for how, k in (("no drafts", 0), ("lookup", 4), ("forced+lookup", 4)):
            e = engine(loaded, k)
            if how == "lookup":
                e._scheduler.forced = None
            e.generate([ids], params)
            best, out, steps = float("inf"), [], 0
            for _ in range(3):
                e.num_accepted_tokens = e.num_draft_tokens = 0
                started = time.perf_counter()
                e.add_request("r", ids, params)
                out, steps = [], 0
                while e.has_unfinished:
                    out.extend(token for o in e.step().outputs for token in o.new_token_ids)
                    steps += 1
                best = min(best, time.perf_counter() - started)
            print(f"{name:6s} {how:13s}: {len(out)} tokens in {steps} steps, {len(out) / best:6.1f} tok/s, "
                  f"drafts kept {e.num_accepted_tokens} of {e.num_draft_tokens}", flush=True)


def lookup_matrix(loaded) -> None:
    """Prompt lookup off and on (K=4) across texts, decodings and 1 or 4 requests at once: output
    tok/s and the median ratio of REPEATS pairs of runs, off then on (160 tokens each, eos ignored,
    so every run does the same work; one at a time goes through the texts in turn), seeded
    globally per run."""
    from tests.helpers.real_engine import chat_ids

    texts = {"rewrite": [REWRITE], "story": [STORY], "questions": list(QUESTIONS)}
    engines = {k: engine(loaded, k) for k in (0, 4)}
    for text_name, texts_ in texts.items():
        prompts = [chat_ids(loaded.tokenizer, t) for t in texts_]
        for e in engines.values():
            e.generate(prompts, SamplingParams(temperature=0, max_tokens=1))  # prompts cached
        for decoding, fields in DECODINGS.items():
            params = SamplingParams(max_tokens=160, ignore_eos=True, **fields)
            for width in (1, 4):
                batches = [[p] for p in prompts] if width == 1 else [[prompts[i % len(prompts)] for i in range(4)]]
                rates: dict[int, list[float]] = {0: [], 4: []}
                drafted = engines[4].num_draft_tokens, engines[4].num_accepted_tokens
                for _ in range(REPEATS):  # off and on in turn: a drift in the machine's speed hits both
                    for k, e in engines.items():
                        torch.manual_seed(0)
                        started = time.perf_counter()
                        tokens = sum(len(out) for batch in batches for out in e.generate(batch, params))
                        rates[k].append(tokens / (time.perf_counter() - started))
                ratios = sorted(on / off for off, on in zip(rates[0], rates[4]))
                best = {k: max(v) for k, v in rates.items()}
                kept = (engines[4].num_accepted_tokens - drafted[1], engines[4].num_draft_tokens - drafted[0])
                print(f"{text_name:9s} {decoding:9s} x{width}: best off {best[0]:6.1f} on {best[4]:6.1f} tok/s; "
                      f"on/off median {ratios[len(ratios) // 2]:.2f}x (range {ratios[0]:.2f}-{ratios[-1]:.2f}); "
                      f"drafts kept {kept[0]}/{kept[1]}", flush=True)


def lookup_busy(loaded, levels: str = BUSY_LEVELS, waves: tuple[int, ...] = (1, 6), loops: bool = False) -> None:
    """Prompt lookup off and on (K=4) with C greedy requests running at once, a new one admitted as
    each finishes, C x W in all (W = 1: one batch that starts and ends together; more: a server's
    steady flow), 160 tokens each, eos ignored; the texts of lookup-matrix in turn, each request's
    its own ("(i) " first), or with `loops` 128 distinct token ids each, no text (as bench
    compare's fixed-length set: greedy decoding sends such continuations round loops). Output
    tok/s and the median on/off ratio of REPEATS // 2 + 1 pairs."""
    from tests.helpers.real_engine import chat_ids

    texts = [REWRITE, STORY, *QUESTIONS]

    def prompt(i: int) -> list[int]:
        if loops:
            return [1000 + (i * 131 + j * 7919) % 30000 for j in range(128)]
        return chat_ids(loaded.tokenizer, f"({i}) {texts[i % len(texts)]}")

    params = SamplingParams(temperature=0, max_tokens=160, ignore_eos=True)
    engines = {k: engine(loaded, k) for k in (0, 4)}

    def flow(e: LLMEngine, prompts: list[list[int]], width: int) -> float:
        waiting, running = list(prompts), 0
        started = time.perf_counter()
        while waiting or e.has_unfinished:
            while waiting and running < width:
                e.add_request(f"busy-{len(waiting)}-{time.perf_counter_ns()}", waiting.pop(0), params)
                running += 1
            running -= sum(out.finished for out in e.step().outputs)
        return len(prompts) * params.max_tokens / (time.perf_counter() - started)

    for width in (int(level) for level in levels.split(",")):
        for w in waves:
            prompts = [prompt(i) for i in range(width * w)]
            for e in engines.values():
                flow(e, prompts, width)  # prompts cached, as a server's repeated system prompts would be
            rates: dict[int, list[float]] = {0: [], 4: []}
            drafted = engines[4].num_draft_tokens, engines[4].num_accepted_tokens
            for _ in range(REPEATS // 2 + 1):
                for k, e in engines.items():
                    rates[k].append(flow(e, prompts, width))
            ratios = sorted(on / off for off, on in zip(rates[0], rates[4]))
            kept = (engines[4].num_accepted_tokens - drafted[1], engines[4].num_draft_tokens - drafted[0])
            print(f"{width:3d} at once x {w:2d}: best off {max(rates[0]):6.1f} on {max(rates[4]):6.1f} tok/s; on/off "
                  f"median {ratios[len(ratios) // 2]:.3f}x (range {ratios[0]:.3f}-{ratios[-1]:.3f}); drafts kept "
                  f"{kept[0]}/{kept[1]}", flush=True)


def level_prompts(level: str, round_: int) -> list[list[int]]:
    """'64x128': 64 prompts of 128 tokens; '64x128-384': 64 prompts of 128 to 384 tokens, evenly
    spread (a running batch's sequences differ in length); '64x1024+64': 64 prompts of one shared
    1,024 tokens (a system prompt, n completions of one prompt) and 64 of their own. Distinct
    tokens from round to round, so that no round finds another's in the prefix cache."""
    width, span = level.split("x")
    n = int(width)
    shared_text, plus, own_text = span.partition("+")
    if plus:
        shared, own = int(shared_text), int(own_text)
        lens = [own] * n
        prefix = [1000 + (round_ * 997 + j * 11) % 30000 for j in range(shared)]
    else:
        low, _, high = span.partition("-")
        first, last = int(low), int(high or low)
        lens = [first + (last - first) * i // max(1, n - 1) for i in range(n)]
        prefix = []
    return [prefix + [1000 + (round_ * 997 + i * 131 + j * 7) % 30000 for j in range(length)]
            for i, length in enumerate(lens)]


def scatter_free_blocks(e: LLMEngine, seed: int = 7) -> None:
    """Mixed traffic through `e` (prompts of 16-600 tokens, 1-64 out, 64 at a time) until it has
    passed twice the cache's tokens, after which its free blocks lie in the order a server's do
    after a while: a new sequence's blocks scattered over the cache rather than one after another
    as in a fresh pool."""
    rng = random.Random(seed)
    to_pass = 2 * e.load().num_kv_blocks * BLOCK_SIZE  # tokens
    live = sent = 0
    while to_pass > 0 or e.has_unfinished:
        while to_pass > 0 and live < 64:
            prompt, max_tokens = [rng.randrange(1000, 40000) for _ in range(rng.randrange(16, 601))], rng.randrange(1, 65)
            e.add_request(f"scatter-{sent}", prompt, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True))
            to_pass -= len(prompt) + max_tokens
            live, sent = live + 1, sent + 1
        live -= sum(out.finished for out in e.step().outputs)


def adjacent_share(e: LLMEngine) -> float:
    """Of the running sequences' consecutive blocks, the share that lie next to each other (the
    measurement reaches inside the engine for its block tables)."""
    running = e._scheduler.running
    pairs = [(a, b) for request in running for a, b in zip(request.block_ids, request.block_ids[1:])]
    return sum(b == a + 1 for a, b in pairs) / max(1, len(pairs))


def decode(loaded, levels: str = DECODE_LEVELS, scattered: bool = False) -> None:
    """N sequences decoding together after prompts of P tokens (level_prompts): the time until every
    sequence has its first token (as prompt tok/s: the early ones decode meanwhile), then
    DECODE_STEPS steps of all N decoding, as output tok/s and ms per step; best of 3 rounds each.
    The KV cache holds every sequence (3 GiB), so nothing is preempted. `scattered`: mixed traffic
    first (scatter_free_blocks), so that the sequences' blocks lie as on a server that has run a
    while; the share of neighbouring blocks (each the one after the block before) in the last
    round is printed."""
    for level in levels.split(","):
        e = engine(loaded, kv_cache_bytes=3 << 30)
        if scattered:
            scatter_free_blocks(e)
        params = SamplingParams(temperature=0, max_tokens=4096, ignore_eos=True)
        best, best_prompt = float("inf"), float("inf")
        for round_ in range(3):
            prompts = level_prompts(level, round_)
            width = len(prompts)
            ids = [f"{round_}-{i}" for i in range(width)]
            for request_id, prompt in zip(ids, prompts):
                e.add_request(request_id, prompt, params)
            started_ids: set[str] = set()
            started = time.perf_counter()
            while len(started_ids) < width:
                started_ids.update(out.request_id for out in e.step().outputs if out.new_token_ids)
            best_prompt = min(best_prompt, (time.perf_counter() - started) / sum(map(len, prompts)))
            started = time.perf_counter()
            for _ in range(DECODE_STEPS):
                tokens = sum(len(out.new_token_ids) for out in e.step().outputs)
                assert tokens == width, f"a step of {tokens} tokens, not {width}: the batch is not all decoding"
            best = min(best, (time.perf_counter() - started) / DECODE_STEPS)
            adjacent = adjacent_share(e)
            for request_id in ids:
                e.abort_request(request_id)
            while e.has_unfinished:
                e.step()
        print(f"{width:2d} x {level.split('x')[1]:>8s}-token prompts: prompts {1 / best_prompt:7.1f} tok/s; decode "
              f"{width / best:7.1f} tok/s, {best * 1000:6.2f} ms per step; neighbouring blocks {adjacent:.0%}", flush=True)


# The prompt attention's profiler events: lmserve's kernels (kernels/prompt_attention.cpp), or PyTorch's.
PROMPT_ATTENTION_EVENTS = ("lmserve::prompt_attention", "lmserve::paged_prompt_attention",
                           "aten::scaled_dot_product_attention")


def prefill(loaded) -> None:
    """One prompt alone (distinct tokens, nothing cached), best of 3: prompt tok/s, then another
    under torch.profiler for the time in the prompt's attention (the native kernel on a bf16 or int8
    cache where the CPU has AVX512-BF16, scaled_dot_product_attention elsewhere; the projections
    are native kernels the profiler does not see), as a share of the best time."""
    from torch.profiler import ProfilerActivity, profile

    params = SamplingParams(temperature=0, max_tokens=1)
    for length in (128, 512, 2000):
        e = engine(loaded)
        prompts = [[1000 + (round_ * 997 + j * 7) % 30000 for j in range(length)] for round_ in range(4)]
        best = float("inf")
        for prompt in prompts[:3]:
            started = time.perf_counter()
            e.generate([prompt], params)
            best = min(best, time.perf_counter() - started)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            e.generate([prompts[3]], params)
        attention = sum(event.cpu_time_total for event in prof.key_averages()
                        if event.key in PROMPT_ATTENTION_EVENTS) / 1e6
        print(f"{length:4d}-token prompt: {length / best:7.1f} tok/s ({best * 1000:6.1f} ms); attention "
              f"{attention * 1000:6.1f} ms in a profiled run, {attention / best:.0%} of the best time", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.engine_steps", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=("costly", "chunk", "lookup", "forced", "lookup-matrix", "lookup-busy",
                                         "decode", "prefill"))
    parser.add_argument("--scattered", action="store_true", help="decode: mixed traffic first, so that blocks lie "
                        "scattered as on a server that has run a while")
    parser.add_argument("--levels", help="decode: sequences x prompt tokens (a range, 128-384; or shared + own, "
                        f"1024+64), comma-separated (default {DECODE_LEVELS}); lookup-busy: requests at once ({BUSY_LEVELS})")
    parser.add_argument("--loops", action="store_true", help="lookup-busy: prompts of distinct token ids "
                        "(greedy continuations go round loops) instead of real texts")
    parser.add_argument("--kv-cache-dtype", choices=("auto", "int8"), default="auto",
                        help="the engines' KV cache, as serve's flag (auto: bf16 here)")
    args = parser.parse_args()
    KV_CACHE_DTYPE[0] = args.kv_cache_dtype
    torch.set_num_threads(2)
    loaded = load_model(default_model_path(), "int4", max_positions=2048)
    if args.what == "decode":
        decode(loaded, args.levels or DECODE_LEVELS, args.scattered)
    elif args.what == "lookup-busy":
        lookup_busy(loaded, args.levels or BUSY_LEVELS, loops=args.loops)
    else:
        {"costly": costly, "chunk": chunk, "lookup": lookup, "forced": forced, "lookup-matrix": lookup_matrix,
         "prefill": prefill}[args.what](loaded)


if __name__ == "__main__":
    main()
