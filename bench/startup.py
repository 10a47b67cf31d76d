"""Time from starting a server to its /health answering 200, lmserve against llama-server on the
same GGUF, both without flags beyond the port (and lmserve's --no-embedding-model, as llama-server
serves one model), runs alternating between the two:

    .venv/bin/python -m bench.startup --llama-server PATH [--gguf FILE] [--runs 3]

Both answer 503 while loading, so this is what a user (or a fleet loading on demand, or a
service manager) waits for before the first request can run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench.servers import ServerCommand, free_ports, running_server
from lmserve.cli import default_model_path


def seconds_to_healthy(command: ServerCommand) -> float:
    started = time.perf_counter()
    with running_server(command, poll_s=0.02):
        return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--llama-server", type=Path, required=True)
    parser.add_argument("--gguf", type=Path, default=default_model_path())
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    logs = Path(tempfile.mkdtemp(prefix="lmserve-startup-"))
    times: dict[str, list[float]] = {"lmserve": [], "llama.cpp": []}
    for run in range(args.runs):
        port, llama_port = free_ports(2)
        commands = [
            ServerCommand("lmserve", [sys.executable, "-m", "lmserve.cli", "serve", str(args.gguf), "--port", str(port),
                                      "--no-embedding-model"], port, logs / "lmserve.log"),
            ServerCommand("llama.cpp", [str(args.llama_server), "-m", str(args.gguf), "--host", "127.0.0.1",
                                        "--port", str(llama_port)], llama_port, logs / "llama.log"),
        ]
        for command in commands if run % 2 == 0 else commands[::-1]:
            times[command.label].append(seconds_to_healthy(command))
    for label, values in times.items():
        print(f"{label:10s} " + " ".join(f"{value:.2f}" for value in values) + f" s (median {statistics.median(values):.2f})")
    ratio = statistics.median(times["lmserve"]) / statistics.median(times["llama.cpp"])
    print(f"lmserve / llama.cpp, median time to healthy: {ratio:.2f}x (below 1: lmserve is ready sooner)")


if __name__ == "__main__":
    main()
