"""`lmserve chat` as a user runs it, input piped: against the shared server, and with a model file,
on a server of its own that ends with the chat."""

from __future__ import annotations

import subprocess
import sys

from lmserve.cli import default_model_path


def chat(*args: str, lines: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lmserve.cli", "chat", *args], input=lines, capture_output=True,
                          text=True, timeout=300)


def replies(stdout: str) -> list[str]:
    """What came back after each prompt (input() writes its prompt to stdout when piped)."""
    return [part.strip() for part in stdout.split(">>> ")[1:] if part.strip()]


def test_a_chat_with_the_running_server(server):
    done = chat("--url", server["url"], "--system", "Answer in one short sentence.", "--max-tokens", "24",
                lines="What is the capital of France?\n/reset\n/bye\n")
    assert done.returncode == 0, done.stderr
    answer, reset = replies(done.stdout)
    assert answer and reset == "(started over)"  # sampled at the server's defaults: any text will do


def test_a_model_file_gets_a_server_of_its_own_for_the_chat():
    done = chat(str(default_model_path()), "--temperature", "0", "--max-tokens", "16", lines="Say hello.\n")  # EOF ends it
    assert done.returncode == 0, done.stderr
    assert replies(done.stdout) and replies(done.stdout)[0]
    leftover = subprocess.run(["pgrep", "-f", "lmserve-chat-"], capture_output=True, text=True)
    assert leftover.stdout == ""  # its server stopped with the chat
