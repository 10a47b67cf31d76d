"""What a tool parser reports: content text and OpenAI-shaped tool call deltas."""

from __future__ import annotations

import secrets
import string
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

_ID_ALPHABET = string.ascii_letters + string.digits


def make_tool_call_id() -> str:
    """A fresh OpenAI-style tool call id: "call_" and 24 random alphanumerics."""
    return "call_" + "".join(secrets.choice(_ID_ALPHABET) for _ in range(24))


def make_mistral_tool_call_id() -> str:
    """A fresh id of 9 alphanumerics: Mistral's chat templates refuse any other id when the
    conversation comes back ("Tool call IDs should be alphanumeric strings with length 9!");
    vLLM gives Mistral models' calls the same kind."""
    return "".join(secrets.choice(_ID_ALPHABET) for _ in range(9))


@dataclass
class ContentDelta:
    """Plain assistant text (never any part of a tool-call tag)."""

    text: str


@dataclass
class ToolCallDelta:
    """One `choices[].delta.tool_calls[]` entry, exactly as OpenAI streams it.

    The first delta of a call carries index, id and name (arguments "" or its first fragment);
    later ones carry only index and the next arguments fragment (id and name None).
    """

    index: int
    id: str | None
    name: str | None
    arguments: str


Event = ContentDelta | ToolCallDelta


@dataclass
class ToolCall:
    """One complete call: `arguments` is the JSON text of the arguments (an object as written)."""

    id: str
    name: str
    arguments: str


@dataclass
class ParsedToolOutput:
    """A whole generation split into its content (outside tool-call markup) and its calls."""

    content: str
    tool_calls: list[ToolCall] = field(default_factory=list)


def collect_events(events: Iterable[Event]) -> ParsedToolOutput:
    """Fold a stream of events into the whole result, as a client concatenating deltas would."""
    content: list[str] = []
    calls: list[ToolCall] = []
    for event in events:
        if isinstance(event, ContentDelta):
            content.append(event.text)
        elif event.id is not None:
            assert event.index == len(calls), "tool call indices must be dense and ordered"
            calls.append(ToolCall(event.id, event.name or "", event.arguments))
        else:
            calls[event.index].arguments += event.arguments
    return ParsedToolOutput("".join(content), calls)


class Emitter:
    """Collects the events of one feed()/finish() call, merging adjacent pieces of the same kind.

    Owns the call numbering, so indices are dense in the order calls start.
    """

    def __init__(self, id_factory: Callable[[], str]):
        self._id_factory = id_factory
        self._events: list[Event] = []
        self.num_calls = 0

    def content(self, text: str) -> None:
        if not text:
            return
        last = self._events[-1] if self._events else None
        if isinstance(last, ContentDelta):
            last.text += text
        else:
            self._events.append(ContentDelta(text))

    def start_call(self, name: str) -> None:
        self._events.append(ToolCallDelta(self.num_calls, self._id_factory(), name, ""))
        self.num_calls += 1

    def arguments(self, text: str) -> None:
        """Append arguments text to the call started last."""
        assert self.num_calls > 0, "arguments before any call started"
        if not text:
            return
        last = self._events[-1] if self._events else None
        if isinstance(last, ToolCallDelta) and last.index == self.num_calls - 1:
            last.arguments += text
        else:
            self._events.append(ToolCallDelta(self.num_calls - 1, None, None, text))

    def take(self) -> list[Event]:
        events, self._events = self._events, []
        return events
