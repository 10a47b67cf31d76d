"""Start and stop the servers `compare` measures, one at a time."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from bench.workloads import Workload

BUILD_HINT = (
    "build it with `bash bench/build_llama_server.sh`, or by hand from the llama-cpp-python 0.3.36 sdist:\n"
    "  cmake -S <sdist>/vendor/llama.cpp -B build -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF "
    "-DCMAKE_BUILD_TYPE=Release -DLLAMA_BUILD_TESTS=OFF && cmake --build build --target llama-server -j2\n"
    "then pass --llama-server build/bin/llama-server"
)
CONTEXT_ALIGN_TOKENS = 256  # llama.cpp pads its KV cache; a round per-slot size avoids surprises


@dataclass(frozen=True)
class ServerCommand:
    """A server process to start: its argv, where it listens, where its log goes."""

    label: str
    argv: list[str]
    port: int
    log_path: Path
    load_timeout_s: float = 300.0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def free_ports(count: int) -> list[int]:
    """`count` distinct ports free right now (all held open together, so the kernel cannot repeat one)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def lmserve_command(binary: Path, gguf: Path, model: str, port: int, max_num_seqs: int,
                    extra_args: list[str], log_path: Path) -> ServerCommand:
    # Our defaults first: argparse keeps the last value, so --lmserve-args can override them.
    argv = [str(binary), "serve", str(gguf), "--port", str(port), "--served-model-name", model,
            "--max-num-seqs", str(max_num_seqs), *extra_args]
    return ServerCommand("lmserve", argv, port, log_path)


def slot_tokens(workload: Workload) -> int:
    """Context of one sequence: the workload's prompt + output, rounded up."""
    return -(-workload.context_tokens // CONTEXT_ALIGN_TOKENS) * CONTEXT_ALIGN_TOKENS


def llama_context_tokens(workload: Workload) -> int:
    """-c for llama-server: with an explicit --parallel N it is split evenly across the N slots."""
    return workload.concurrency * slot_tokens(workload)


def llama_server_command(binary: Path, gguf: Path, model: str, port: int, workload: Workload,
                         threads: int, extra_args: list[str], log_path: Path) -> ServerCommand:
    argv = [str(binary), "-m", str(gguf), "--alias", model, "-t", str(threads),
            "--parallel", str(workload.concurrency), "-c", str(llama_context_tokens(workload)),
            "--host", "127.0.0.1", "--port", str(port), *extra_args]
    return ServerCommand("llama.cpp", argv, port, log_path)


@contextmanager
def running_server(command: ServerCommand, poll_s: float = 0.25) -> Iterator[int]:
    """Start the server, wait until /health answers 200 (asked every `poll_s`), yield its pid;
    always stop it after."""
    command.log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(command.log_path, "ab") as log:
        # A session of its own, so stopping it reaches any helper processes it spawned.
        process = subprocess.Popen(command.argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   start_new_session=True)
    try:
        wait_healthy(command, process, poll_s)
        yield process.pid
    finally:
        stop_server(process)


def wait_healthy(command: ServerCommand, process: subprocess.Popen, poll_s: float = 0.25) -> None:
    """Poll /health (both servers answer 503 while loading) until 200; fail fast if the process dies."""
    deadline = time.monotonic() + command.load_timeout_s
    with httpx.Client(timeout=5.0, trust_env=False) as client:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"{command.label} exited with {process.returncode} while loading"
                                   f"{_exit_hint(process.returncode)}:\n{log_tail(command.log_path)}")
            try:
                if client.get(f"{command.url}/health").status_code == 200:
                    return
            except httpx.HTTPError:
                pass  # not listening yet
            time.sleep(poll_s)
    raise RuntimeError(f"{command.label} not healthy after {command.load_timeout_s:.0f} s:\n"
                       f"{log_tail(command.log_path)}")


def _exit_hint(returncode: int) -> str:
    if returncode in (-signal.SIGILL, 128 + signal.SIGILL):
        # Seen with llama.cpp built -march=native in a VM whose CPUID advertises AMX it cannot run.
        return (" (illegal instruction: the binary uses an instruction this CPU will not execute; for llama.cpp "
                "try --llama-server-args=--no-repack, or rebuild with bench/build_llama_server.sh)")
    return ""


def stop_server(process: subprocess.Popen, grace_s: float = 15.0) -> None:
    """SIGTERM to the server's own process group, SIGKILL if it lingers."""
    if process.poll() is None:
        _signal_group(process.pid, signal.SIGTERM)
        try:
            process.wait(grace_s)
        except subprocess.TimeoutExpired:
            _signal_group(process.pid, signal.SIGKILL)
            process.wait()
    _signal_group(process.pid, signal.SIGKILL)  # anything of its group that outlived it


def _signal_group(pid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pid, sig)  # the group we created with start_new_session: its id is the server's pid
    except ProcessLookupError:
        pass


def log_tail(path: Path, num_lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-num_lines:])
    except OSError:
        return "(no log)"
