"""Server-sent events of a streaming completion: lines -> event payloads -> chunks.

lmserve sends a content chunk per detokenized delta, a finish chunk with empty text and, when
asked, a usage chunk with `choices: []`. llama.cpp's llama-server sends one chunk per token (its
text may be empty while a UTF-8 sequence or a possible stop string is held back) and puts
`usage` (always) and `timings` on the finish chunk. Both end with `data: [DONE]` and report an
error after the stream started as `data: {"error": {...}}`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass


@dataclass(frozen=True)
class StreamChunk:
    """What the harness needs from one event: its text, usage if any, an error if any."""

    text: str = ""
    has_choices: bool = False  # a token event, even one whose text is held back
    usage: dict | None = None
    error: str | None = None
    done: bool = False


class SSEDecoder:
    """Feed it lines without their terminators; it returns each event's data once complete."""

    def __init__(self) -> None:
        self._data: list[str] = []

    def feed(self, line: str) -> str | None:
        if line == "":
            return self.flush()
        if line.startswith(":"):  # a comment, e.g. a keep-alive
            return None
        field, _, value = line.partition(":")
        if field == "data":
            self._data.append(value.removeprefix(" "))  # one optional space after the colon
        return None

    def flush(self) -> str | None:
        """The pending event's data, if any: also call at end of stream (a missing last blank line)."""
        if not self._data:
            return None
        payload = "\n".join(self._data)
        self._data = []
        return payload


def parse_chunk(payload: str) -> StreamChunk:
    """One event's data -> StreamChunk. Handles completion (`text`) and chat (`delta.content`)."""
    if payload.strip() == "[DONE]":
        return StreamChunk(done=True)
    try:
        obj = json.loads(payload)
    except json.JSONDecodeError:
        return StreamChunk(error=f"not JSON: {payload[:200]!r}")
    if not isinstance(obj, dict):
        return StreamChunk(error=f"unexpected event: {payload[:200]!r}")
    if obj.get("error"):
        return StreamChunk(error=error_message(obj["error"]))
    choices = obj.get("choices") or []
    return StreamChunk(text=_choices_text(choices), has_choices=bool(choices), usage=obj.get("usage") or None)


def error_message(error: object) -> str:
    """OpenAI-shaped `{"message": ...}` or anything else, as one line."""
    if isinstance(error, dict) and "message" in error:
        return str(error["message"])
    return str(error)


def _choices_text(choices: list[dict]) -> str:
    parts = []
    for choice in choices:
        delta = choice.get("delta") or {}
        parts.append(choice.get("text") or delta.get("content") or "")
    return "".join(parts)
