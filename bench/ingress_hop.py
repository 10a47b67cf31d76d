"""`python -m bench.ingress_hop`: what the Ray Serve ingress costs. lmserve served directly, then
through Ray Serve with one replica (`--replicas 1`, the replica reserving every core), on the
same GGUF, the same streamed decode workload, one server at a time; prints throughput, TTFT and
ITL side by side and the ratio (the target: within 10% of direct). `--cpus 1` on a 2-core machine
leaves the ingress and Ray's own processes a core, as a machine with cores to spare would.
Runs on these machines differ by ~10% from one to the next, so `--rounds N` alternates the two
servers N times and prints each round and the median of the rounds' ratios.

Needs the bench and ray extras: pip install -e '.[bench,ray]'.
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
from pathlib import Path

from bench.client import Target
from bench.compare import default_gguf, default_lmserve
from bench.output import default_out_dir
from bench.report import comparison_table
from bench.runner import LevelRun, RunOptions, run_workload
from bench.servers import free_ports, lmserve_command, running_server, slot_tokens
from bench.workloads import level_workloads


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.ingress_hop", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--num-requests", type=int, help="default: 2 x concurrency")
    parser.add_argument("--gguf", type=Path, help="default: the packaged SmolLM2-135M-Instruct Q4_1")
    parser.add_argument("--lmserve-args", default="", help="extra `lmserve serve` arguments for both")
    parser.add_argument("--cpus", type=int, help="the engine's threads, directly and in the replica (which reserves "
                        "as many CPUs); default: every core. Fewer leaves the ingress and Ray cores of their own")
    parser.add_argument("--rounds", type=int, default=2, help="direct then Ray Serve, this many times (default 2)")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--out", type=Path, help="logs folder (default: bench/out/ingress_hop-<time>)")
    args = parser.parse_args(argv)
    gguf = args.gguf or default_gguf()
    workload, = level_workloads([args.concurrency], args.prompt_tokens, args.max_tokens, 0, args.num_requests)
    out = args.out or default_out_dir("ingress_hop")
    cores = str(args.cpus or os.cpu_count() or 1)
    common = ["--no-embedding-model", "--max-model-len", str(slot_tokens(workload)), *shlex.split(args.lmserve_args)]
    ratios: dict[str, list[float]] = {"output tok/s": [], "TTFT p50": [], "ITL p50": []}
    for round_number in range(1, args.rounds + 1):
        runs: dict[str, LevelRun] = {}
        for label, extra in (("direct", ["--threads", cores]), ("ray-serve", ["--replicas", "1", "--replica-cpus", cores])):
            port, = free_ports(1)
            command = lmserve_command(default_lmserve(), gguf, gguf.stem, port, args.concurrency, common + extra,
                                      out / f"{label}-{round_number}.log")
            print(f"[{label}, round {round_number}] {' '.join(command.argv)}", file=sys.stderr)
            with running_server(command) as pid:
                runs[label] = run_workload(Target(command.url, gguf.stem), workload, label, pid,
                                           RunOptions(progress=not args.no_progress))
        ray, direct = runs["ray-serve"].report, runs["direct"].report
        print(f"round {round_number}")
        print(comparison_table([ray], [direct], "ray-serve", "direct"))
        for name, attribute in (("output tok/s", "output_tok_s"), ("TTFT p50", "ttft_p50_s"), ("ITL p50", "itl_p50_s")):
            if getattr(ray, attribute) and getattr(direct, attribute):
                ratios[name].append(getattr(ray, attribute) / getattr(direct, attribute))
    print("median of the rounds' ratios (ray-serve / direct): " + ", ".join(
        f"{name} {statistics.median(values):.2f}x ({', '.join(f'{v:.2f}' for v in values)})"
        for name, values in ratios.items() if values))


if __name__ == "__main__":
    main()
