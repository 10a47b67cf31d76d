"""Does a draft model pay? Output tokens/s of greedy chat requests, each server with and without
`--draft-model`, on the packaged model.

    .venv/bin/python -m bench.draft_model [--concurrency 1,4] [--max-tokens 128] [--targets float32,bfloat16,int4]

For each target dtype, two servers one after the other: the target alone (prompt lookup on, the
default) and the target drafted by the packaged model's own int4 copy (`--draft-model <the same
GGUF> --draft-dtype int4`). At each concurrency every prompt of PROMPTS is sent once (greedy, real
text: how often drafts are kept depends on it); prints output tok/s, the ratio, and the share of
drafts kept (from /metrics).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from bench.engine_steps import QUESTIONS, REWRITE, STORY
from bench.servers import ServerCommand, free_ports, running_server
from lmserve.cli import default_model_path

PROMPTS = [*QUESTIONS, STORY, REWRITE, "Summarize the plot of Romeo and Juliet in five sentences.",
           "Write a limerick about a programmer who never sleeps."]


def chat_tokens(url: str, prompt: str, max_tokens: int) -> int:
    body = {"model": "m", "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0}
    response = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=600, trust_env=False)
    response.raise_for_status()
    return response.json()["usage"]["completion_tokens"]


def draft_counts(url: str) -> tuple[float, float]:
    drafted = kept = 0.0
    for line in httpx.get(f"{url}/metrics", trust_env=False).text.splitlines():
        if line.startswith("lmserve:spec_decode_num_draft_tokens_total"):
            drafted += float(line.rsplit(" ", 1)[1])
        elif line.startswith("lmserve:spec_decode_num_accepted_tokens_total"):
            kept += float(line.rsplit(" ", 1)[1])
    return drafted, kept


def measure(url: str, concurrency: int, max_tokens: int) -> tuple[float, float | None]:
    """(output tok/s, share of drafts kept) of every prompt sent once, `concurrency` at a time."""
    chat_tokens(url, "Hello", 8)  # warm-up
    before = draft_counts(url)
    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        tokens = sum(pool.map(lambda prompt: chat_tokens(url, prompt, max_tokens), PROMPTS))
    rate = tokens / (time.perf_counter() - started)
    drafted, kept = (after - first for after, first in zip(draft_counts(url), before))
    return rate, (kept / drafted if drafted else None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", default="1,4")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--targets", default="float32,bfloat16,int4")
    args = parser.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    gguf = default_model_path()
    binary = Path(__file__).resolve().parent.parent / ".venv/bin/lmserve"
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for target in args.targets.split(","):
            results = {}
            for label, extra in (("alone", []), ("drafted", ["--draft-model", str(gguf), "--draft-dtype", "int4"])):
                [port] = free_ports(1)
                argv = [str(binary), "serve", str(gguf), "--port", str(port), "--served-model-name", "m",
                        "--dtype", target, "--threads", "2", "--no-embedding-model", "--log-level", "warning", *extra]
                command = ServerCommand(label, argv, port, Path(folder) / f"{target}-{label}.log")
                with running_server(command):
                    results[label] = {c: measure(command.url, c, args.max_tokens) for c in levels}
            for c in levels:
                (alone, _), (drafted, kept) = results["alone"][c], results["drafted"][c]
                rows.append((target, c, alone, drafted, kept))
    print(f"{'target':>9} {'streams':>7} {'alone tok/s':>11} {'drafted tok/s':>13} {'ratio':>6} {'drafts kept':>11}")
    for target, c, alone, drafted, kept in rows:
        kept_text = f"{kept:.0%}" if kept is not None else "-"
        print(f"{target:>9} {c:>7} {alone:>11.1f} {drafted:>13.1f} {drafted / alone:>5.2f}x {kept_text:>11}")


if __name__ == "__main__":
    main()
