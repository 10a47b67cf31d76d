"""python -m bench run|compare: see `python -m bench <command> --help`."""

from __future__ import annotations

import argparse
import importlib.util
import shlex
import sys
import time
from pathlib import Path

import httpx

from bench.client import Target
from bench.report import level_table
from bench.runner import LevelRun, RunOptions, run_workload
from bench.workloads import KINDS, Workload, level_workloads, parse_kinds, workload_set


def int_list(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma list of integers: {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"need positive integers: {text!r}")
    return values


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workloads", help=f"a named set instead of the level options: default ({','.join(KINDS)}) "
                        f"or a comma list of {', '.join(KINDS)}")
    parser.add_argument("--quick", action="store_true",
                        help="shrink the workload set for a smoke test (max_tokens 64, few requests)")
    parser.add_argument("--concurrency", type=int_list, help="comma list of concurrent streams")
    parser.add_argument("--max-tokens", type=int, help="output tokens per request (ignore_eos: exactly this many)")
    parser.add_argument("--temperature", type=float, default=0.0,
                        help="of every request (default 0: greedy); each server's other sampling settings its own")
    parser.add_argument("--seed", default="0",
                        help="prompt RNG seed; change it to re-run on a server whose prefix cache is warm")
    parser.add_argument("--no-warmup", action="store_true",
                        help="skip the one short unmeasured request before each level")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--out", type=Path, help="output folder (default: bench/out/<command>-<time>)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="measure one running OpenAI-compatible server")
    run.add_argument("--url", required=True, help="base URL, e.g. http://127.0.0.1:8080")
    run.add_argument("--model", help="model id to send (default: the first of /v1/models)")
    run.add_argument("--prompt-tokens", type=int, help="prompt length in tokens (default 128)")
    run.add_argument("--shared-prefix-tokens", type=int,
                     help="prompts share this many leading ids; each level then also runs a cold twin")
    run.add_argument("--num-requests", type=int, help="requests per level (default: max(2*C, 4))")
    run.add_argument("--server-pid", type=int, help="sample this process tree's peak RSS")
    run.add_argument("--label", default="server", help="the server's name in reports")
    _common(run)
    compare = commands.add_parser("compare", help="lmserve vs llama.cpp's llama-server on one GGUF")
    compare.add_argument("--gguf", type=Path, help="default: the packaged SmolLM2-135M-Instruct Q4_1")
    compare.add_argument("--llama-server", type=Path, help="default: ~/.cache/lmserve-bench/build/bin/llama-server")
    compare.add_argument("--lmserve", type=Path, help="default: lmserve next to this Python")
    compare.add_argument("--lmserve-args", default="", help='extra `lmserve serve` arguments, e.g. "--dtype bfloat16"')
    compare.add_argument("--llama-server-args", default="", help='extra llama-server arguments, e.g. "--no-repack"')
    compare.add_argument("--threads", type=int, default=2, help="threads of both servers (llama-server -t)")
    _common(compare)
    return parser


def build_workloads(args: argparse.Namespace) -> list[Workload]:
    """The workloads the options describe; a bad combination ends the program with its message."""
    try:
        if args.command == "compare":
            return workload_set(parse_kinds(args.workloads or "default"), args.quick, args.concurrency, args.max_tokens)
        return run_workloads(args)
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from None


def run_workloads(args: argparse.Namespace) -> list[Workload]:
    """The named set (--workloads / --quick) or the levels the options describe; never half of each."""
    if args.workloads or args.quick:
        level_only = [name for name in ("prompt_tokens", "shared_prefix_tokens", "num_requests") if getattr(args, name)]
        if level_only:
            flag = "--" + level_only[0].replace("_", "-")
            raise ValueError(f"{flag} describes levels; it does not apply to --workloads/--quick")
        return workload_set(parse_kinds(args.workloads or "default"), args.quick, args.concurrency, args.max_tokens)
    return level_workloads(args.concurrency or [1, 4, 16], args.prompt_tokens or 128, args.max_tokens or 256,
                           args.shared_prefix_tokens or 0, args.num_requests)


def run_options(args: argparse.Namespace) -> RunOptions:
    return RunOptions(seed=args.seed, warmup=not args.no_warmup, progress=not args.no_progress,
                      temperature=args.temperature)


def served_model(url: str) -> str:
    """The first model id of /v1/models: what to send when --model is not given."""
    try:
        with httpx.Client(timeout=10.0, trust_env=False) as client:
            response = client.get(f"{url}/v1/models")
            response.raise_for_status()
            return response.json()["data"][0]["id"]
    except (httpx.HTTPError, KeyError, IndexError, ValueError) as exc:
        raise SystemExit(f"cannot list the models of {url} ({exc}); is the server up? pass --model") from None


def command_run(args: argparse.Namespace) -> None:
    from bench.output import default_out_dir, write_outputs

    url = args.url.rstrip("/")
    workloads = build_workloads(args)
    target = Target(url, args.model or served_model(url))
    runs = [run_workload(target, w, args.label, args.server_pid, run_options(args)) for w in workloads]
    table = level_table([run.report for run in runs])
    print(table)
    meta = {"command": "run", "argv": sys.argv[1:], "url": url, "model": target.model, "time": time.time()}
    paths = write_outputs(args.out or default_out_dir("run"), meta, runs, table, f"{args.label}: {target.model}")
    print(*(f"wrote {path}" for path in paths), sep="\n")


def command_compare(args: argparse.Namespace) -> None:
    from bench.compare import (
        DEFAULT_LLAMA_SERVER,
        CompareConfig,
        default_gguf,
        default_lmserve,
        print_comparison,
        run_compare,
    )
    from bench.output import default_out_dir, write_json, write_outputs

    out_dir = args.out or default_out_dir("compare")
    config = CompareConfig(
        gguf=args.gguf or default_gguf(), llama_server=args.llama_server or DEFAULT_LLAMA_SERVER,
        lmserve=args.lmserve or default_lmserve(), out_dir=out_dir,
        workloads=build_workloads(args),
        lmserve_args=shlex.split(args.lmserve_args), llama_server_args=shlex.split(args.llama_server_args),
        threads=args.threads, options=run_options(args),
    )
    meta = {"command": "compare", "argv": sys.argv[1:], "gguf": str(config.gguf),
            "llama_server": str(config.llama_server), "lmserve_args": config.lmserve_args,
            "llama_server_args": config.llama_server_args, "time": time.time()}
    runs = run_compare(config, on_level=lambda so_far: write_json(out_dir, meta, flatten(so_far)))
    table = print_comparison(runs)
    paths = write_outputs(out_dir, meta, flatten(runs), table, f"lmserve vs llama.cpp: {config.gguf.name}")
    print(*(f"wrote {path}" for path in paths), sep="\n")


def flatten(runs: dict[str, list[LevelRun]]) -> list[LevelRun]:
    return [run for label_runs in runs.values() for run in label_runs]


BENCH_MODULES = ("httpx", "psutil", "tqdm", "matplotlib")  # the `bench` extra of pyproject.toml


def missing_modules() -> list[str]:
    return [name for name in BENCH_MODULES if importlib.util.find_spec(name) is None]


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    missing = missing_modules()
    if missing:  # say so now, not after the first level has run for minutes
        sys.exit(f"bench needs {', '.join(missing)}: pip install -e '.[bench]'")
    {"run": command_run, "compare": command_compare}[args.command](args)


if __name__ == "__main__":
    main()
