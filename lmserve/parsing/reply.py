"""Chat reply text -> message parts: reasoning_content, content and tool_calls, streamed or whole.

A whole reply is parsed by the same incremental parsers as a stream (fed at once), so streamed
and non-streamed results always agree.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lmserve.parsing.events import ContentDelta, ToolCall, ToolCallDelta, collect_events
from lmserve.parsing.reasoning import ReasoningParser
from lmserve.parsing.tool_parsers import ToolParser


@dataclass(frozen=True)
class ReplyFormat:
    """How to read one chat request's replies."""

    tool_parser: type[ToolParser] | None = None  # parse tool calls in this format
    reasoning: bool = False  # split <think>...</think> into reasoning_content
    starts_in_reasoning: bool = False  # the prompt already opened <think>
    tool_names: frozenset[str] | None = None  # the offered tools (None: any name)


@dataclass
class ReplyDelta:
    content: str = ""
    reasoning: str = ""
    tool_calls: list[ToolCallDelta] = field(default_factory=list)


@dataclass
class Reply:
    content: str | None  # None when the reply is only tool calls
    reasoning: str | None
    tool_calls: list[ToolCall]


class ReplyParser:
    """One reply's parser chain: reasoning split first, then tool calls in what is content."""

    def __init__(self, fmt: ReplyFormat):
        self._reasoning = ReasoningParser(starts_in_reasoning=fmt.starts_in_reasoning) if fmt.reasoning else None
        self._tools = fmt.tool_parser(tool_names=fmt.tool_names) if fmt.tool_parser is not None else None

    @property
    def num_tool_calls(self) -> int:
        """Calls started so far."""
        return self._tools.num_tool_calls if self._tools is not None else 0

    def feed(self, text: str, final: bool = False, truncated: bool = False) -> ReplyDelta:
        """What `text` makes certain; with `final`, also everything held back (the reply ended;
        `truncated`: max_tokens ended it)."""
        if self._reasoning is None:
            return self._content(text, final, truncated)
        split = self._reasoning.feed(text)
        if final:
            rest = self._reasoning.finish()
            split.reasoning, split.content = split.reasoning + rest.reasoning, split.content + rest.content
        delta = self._content(split.content, final, truncated)
        delta.reasoning = split.reasoning
        return delta

    def _content(self, text: str, final: bool, truncated: bool) -> ReplyDelta:
        if self._tools is None:
            return ReplyDelta(content=text)
        events = self._tools.feed(text) if text else []
        if final:
            events += self._tools.finish(truncated)
        delta = ReplyDelta(content="".join(e.text for e in events if isinstance(e, ContentDelta)),
                           tool_calls=[e for e in events if isinstance(e, ToolCallDelta)])
        return delta


def parse_reply(fmt: ReplyFormat, text: str, truncated: bool = False) -> Reply:
    """The whole reply; `truncated`: max_tokens ended it (finish_reason "length")."""
    whole = ReplyParser(fmt).feed(text, final=True, truncated=truncated)
    calls = collect_events(whole.tool_calls).tool_calls
    return Reply(whole.content if whole.content or not calls else None, whole.reasoning or None, calls)
