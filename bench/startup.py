"""Time from starting a server to its /health answering 200, lmserve against llama-server on the
same GGUF, both without flags beyond the port (and lmserve's --no-embedding-model, as llama-server
serves one model), runs alternating between the two:

    .venv/bin/python -m bench.startup --llama-server PATH [--gguf FILE] [--runs 3]

Both answer 503 while loading, so this is what a user (or a fleet loading on demand, or a
service manager) waits for before the first request can run. Then each server's first request with
a JSON schema (`response_format`, 8 tokens) and a second one with another schema: what the first
constrained request adds over the ones after it (a constraint's machinery starts on first use).

lmserve keeps a model's converted weights to map on later starts (lmserve/weights/converted.py), in
a cache folder of this run's: its first start, which converts and writes them, is timed and
printed apart before the alternating runs, which then map them.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

from bench.servers import ServerCommand, free_ports, running_server
from lmserve.cli import default_model_path

SCHEMAS = ({"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]},
           {"type": "object", "properties": {"age": {"type": "integer"}}, "required": ["age"]})


def timed_start(command: ServerCommand) -> list[float]:
    """Seconds to healthy, then the seconds of the first and the second constrained request."""
    started = time.perf_counter()
    with running_server(command, poll_s=0.02):
        times = [time.perf_counter() - started]
        for schema in SCHEMAS:
            body = {"messages": [{"role": "user", "content": "A person as JSON."}], "max_tokens": 8,
                    "temperature": 0, "response_format": {"type": "json_schema",
                                                          "json_schema": {"name": "person", "schema": schema}}}
            sent = time.perf_counter()
            httpx.post(f"{command.url}/v1/chat/completions", json=body, timeout=300, trust_env=False).raise_for_status()
            times.append(time.perf_counter() - sent)
        return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--llama-server", type=Path, required=True)
    parser.add_argument("--gguf", type=Path, default=default_model_path())
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    logs = Path(tempfile.mkdtemp(prefix="lmserve-startup-"))
    os.environ["LMSERVE_WEIGHTS_CACHE"] = str(logs / "weights")  # empty: the first start converts
    times: dict[str, list[list[float]]] = {"lmserve": [], "llama.cpp": []}

    def lmserve(port: int) -> ServerCommand:
        return ServerCommand("lmserve", [sys.executable, "-m", "lmserve.cli", "serve", str(args.gguf), "--port",
                                         str(port), "--no-embedding-model"], port, logs / "lmserve.log")

    first = timed_start(lmserve(free_ports(1)[0]))
    print(f"first start lmserve    {first[0]:.2f} s to healthy (converting its weights and keeping them), "
          f"schemas {first[1]:.2f} {first[2]:.2f} s")
    for run in range(args.runs):
        port, llama_port = free_ports(2)
        commands = [
            lmserve(port),
            ServerCommand("llama.cpp", [str(args.llama_server), "-m", str(args.gguf), "--host", "127.0.0.1",
                                        "--port", str(llama_port)], llama_port, logs / "llama.log"),
        ]
        for command in commands if run % 2 == 0 else commands[::-1]:
            times[command.label].append(timed_start(command))
    medians = {}
    for what, column in (("to healthy", 0), ("first schema", 1), ("second schema", 2)):
        for label, runs in times.items():
            values = [run[column] for run in runs]
            medians[label, column] = statistics.median(values)
            print(f"{what:13s} {label:10s} " + " ".join(f"{value:.2f}" for value in values)
                  + f" s (median {medians[label, column]:.2f})")
    shutil.rmtree(logs / "weights", ignore_errors=True)  # the converted weights: the size of the model
    for what, column in (("time to healthy", 0), ("first constrained request", 1)):
        ratio = medians["lmserve", column] / medians["llama.cpp", column]
        print(f"lmserve / llama.cpp, median {what}: {ratio:.2f}x (below 1: lmserve is sooner)")


if __name__ == "__main__":
    main()
