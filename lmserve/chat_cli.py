"""`lmserve chat [MODEL]`: a terminal chat against a running server (lmserve's, or any server with
OpenAI's chat completions), streamed as it is written. Given a model file or folder, or nothing
while no server answers at the default address, it starts a server of its own for the model (the
packaged one by default) on a private socket, for as long as the chat lasts.

The conversation stays in the terminal and goes with each request, so any such server will do.
Commands: /system TEXT (a new system prompt; starts over), /reset (starts over), /bye (or Ctrl-D)
ends. A line of three double quotes opens a multi-line message, and another closes it. Ctrl-C
stops the reply being written (its request is closed, so the server stops it too) and keeps the
chat; the part already shown stays in the history.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx

HELP = ('Type a message. /system TEXT sets a system prompt, /reset starts over, /bye ends; """ opens and '
        'closes a multi-line message; Ctrl-C stops a reply.')
BLOCK = '"""'


@dataclass
class ChatSession:
    """The conversation so far, and how to talk to the server."""

    client: httpx.Client
    model: str
    system: str | None = None
    settings: dict[str, float | int] = field(default_factory=dict)  # sent with every turn (temperature, max_tokens)
    messages: list[dict[str, str]] = field(default_factory=list)

    def send(self, text: str, write: Callable[[str], None]) -> None:
        """Add `text` as the user's turn and stream the reply through `write`. What was written
        stays in the history (a reply stopped by Ctrl-C included); a turn refused before any
        reply leaves no trace, so the chat can go on."""
        self.messages.append({"role": "user", "content": text})
        parts: list[str] = []
        try:
            for delta in self._deltas():
                parts.append(delta)
                write(delta)
        except (ChatError, httpx.HTTPError):
            if not parts:
                self.messages.pop()
                raise
            self._keep(parts)
            raise
        except KeyboardInterrupt:
            self._keep(parts)
            raise
        self._keep(parts)

    def _keep(self, parts: list[str]) -> None:
        self.messages.append({"role": "assistant", "content": "".join(parts)})

    def reset(self) -> None:
        self.messages = []

    def set_system(self, text: str) -> None:
        """A new system prompt ("" clears it), and a new conversation under it."""
        self.system = text or None
        self.messages = []

    def _deltas(self) -> Iterator[str]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        body = {"model": self.model, "messages": system + self.messages, "stream": True, **self.settings}
        with self.client.stream("POST", "/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                response.read()
                raise ChatError(_error_message(response))
            for line in response.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[len("data: "):])
                if "error" in chunk:
                    raise ChatError(chunk["error"].get("message", "the server reported an error"))
                for choice in chunk.get("choices", []):
                    delta = choice.get("delta") or {}
                    if delta.get("content"):
                        yield delta["content"]


class ChatError(RuntimeError):
    """The server refused or failed a turn; the chat goes on."""


def _error_message(response: httpx.Response) -> str:
    try:
        return response.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return f"HTTP {response.status_code}"


@contextlib.contextmanager
def own_server(model: str | None, timeout: float = 600.0) -> Iterator[httpx.Client]:
    """`lmserve serve MODEL` (the packaged model for None) on a UNIX socket in a temporary folder,
    stopped when the chat ends; yields a client of it. The server runs in a session of its own, so
    the terminal's Ctrl-C stops a reply, not the server."""
    with tempfile.TemporaryDirectory(prefix="lmserve-chat-") as folder:
        socket_path = str(Path(folder) / "lmserve.sock")
        command = [sys.executable, "-m", "lmserve.cli", "serve", *([model] if model else []), "--host", socket_path,
                   "--data-dir", "none", "--no-embedding-model", "--log-level", "warning"]
        server = subprocess.Popen(command, stdout=subprocess.DEVNULL, start_new_session=True)
        transport = httpx.HTTPTransport(uds=socket_path)
        try:
            with httpx.Client(transport=transport, base_url="http://lmserve", timeout=httpx.Timeout(10.0, read=None)) as client:
                _wait_ready(client, server, timeout)
                yield client
        finally:
            server.terminate()
            server.wait(timeout=60)


def _wait_ready(client: httpx.Client, server: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise ChatError(f"the model's server exited ({server.returncode}) before it was ready")
        try:
            if client.get("/health").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise ChatError("the model's server was not ready in time")


def answers(url: str) -> bool:
    """Whether a server answers at `url`."""
    try:
        httpx.get(f"{url}/health", timeout=2)
    except httpx.TransportError:
        return False
    return True


def first_model(client: httpx.Client) -> str:
    """The server's first chat model (what `lmserve chat` talks to when no MODEL is named)."""
    response = client.get("/v1/models")
    response.raise_for_status()
    models = [m for m in response.json()["data"] if m.get("kind", "chat") == "chat"]
    if not models:
        raise ChatError("the server lists no chat model")
    return models[0]["id"]


def run(session: ChatSession, read: Callable[[str], str], write: Callable[[str], None]) -> None:
    """The chat loop: `read(prompt)` gives a line (EOFError ends), `write` shows text."""
    write(HELP + "\n")
    while True:
        try:
            text = _message(read)
        except EOFError:
            write("\n")
            return
        except KeyboardInterrupt:
            write("\n(/bye or Ctrl-D ends the chat)\n")
            continue
        if not text.strip():
            continue
        if text.strip() in ("/bye", "/exit", "/quit"):
            return
        if text.startswith("/"):
            write(_command(session, text.strip()) + "\n")
            continue
        try:
            session.send(text, write)
            write("\n")
        except KeyboardInterrupt:
            write("\n(stopped)\n")
        except (ChatError, httpx.HTTPError) as exc:
            write(f"\nerror: {exc}\n")


def _message(read: Callable[[str], str]) -> str:
    line = read(">>> ")
    if line.strip() != BLOCK:
        return line
    lines = []
    while (line := read("... ")).strip() != BLOCK:
        lines.append(line)
    return "\n".join(lines)


def _command(session: ChatSession, text: str) -> str:
    name, _, argument = text.partition(" ")
    if name == "/reset":
        session.reset()
        return "(started over)"
    if name == "/system":
        session.set_system(argument.strip())
        return "(system prompt set; started over)" if argument.strip() else "(system prompt cleared; started over)"
    return f"unknown command {name}. {HELP}"
