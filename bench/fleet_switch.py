"""What loading on demand costs: time to first token for a model that is not loaded, and for
requests alternating between two models when only one fits (`--max-loaded-models 1`).

    .venv/bin/python -m bench.fleet_switch [--rounds 3]

Starts `lmserve serve --models-dir DIR --max-loaded-models 1` over a folder holding the packaged
model under two names, then times streamed 16-token requests: the first to each model (a load),
one to the model already loaded, and alternating ones (each an unload and a load).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from bench.servers import ServerCommand, free_ports, running_server
from lmserve.cli import default_model_path

PROMPT = [{"role": "user", "content": "Name the capital of France."}]


def first_token_seconds(url: str, model: str) -> float:
    """Seconds from sending a streamed chat request to its first content chunk."""
    body = {"model": model, "messages": PROMPT, "max_tokens": 16, "temperature": 0, "stream": True}
    started = time.perf_counter()
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=300) as response:
        for line in response.iter_lines():
            if '"content":"' in line:
                return time.perf_counter() - started
    raise RuntimeError(f"no content from {model}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        for name in ("first", "second"):
            (Path(folder) / f"{name}.gguf").symlink_to(default_model_path())
        [port] = free_ports(1)
        argv = [str(Path(__file__).resolve().parent.parent / ".venv/bin/lmserve"), "serve", "--port", str(port),
                "--models-dir", folder, "--max-loaded-models", "1", "--no-embedding-model", "--log-level", "warning"]
        command = ServerCommand("lmserve", argv, port, Path(folder) / "server.log")
        with running_server(command):
            url = command.url
            cold = first_token_seconds(url, "first")
            warm = [first_token_seconds(url, "first") for _ in range(args.rounds)]
            switches = [first_token_seconds(url, name) for _ in range(args.rounds) for name in ("second", "first")]
    print(f"first request to an unloaded model: {cold:.2f} s to its first token (load included)")
    print(f"the model already loaded:           {statistics.median(warm):.3f} s (median of {len(warm)})")
    print(f"alternating two models, one loaded: {statistics.median(switches):.2f} s "
          f"(median of {len(switches)}, range {min(switches):.2f}-{max(switches):.2f})")


if __name__ == "__main__":
    main()
