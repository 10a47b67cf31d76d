"""Chat reply text -> message parts: reasoning_content, content and tool_calls, streamed or whole.

A whole reply is parsed by the same incremental parsers as a stream (fed at once), so streamed
and non-streamed results always agree.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lmserve.parsing import ContentDelta, ReasoningParser, ToolCall, ToolCallDelta, collect_events
from lmserve.server.tools import ToolsPlan


@dataclass(frozen=True)
class ReplyFormat:
    """How to read one chat request's replies."""

    tools: ToolsPlan | None = None  # parse tool calls in this plan's format
    reasoning: bool = False  # split <think>...</think> into reasoning_content
    starts_in_reasoning: bool = False  # the prompt already opened <think>


@dataclass
class ReplyDelta:
    content: str = ""
    reasoning: str = ""
    tool_calls: list[ToolCallDelta] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.content or self.reasoning or self.tool_calls)


@dataclass
class Reply:
    content: str | None  # None when the reply is only tool calls
    reasoning: str | None
    tool_calls: list[ToolCall]


class ReplyParser:
    """One sequence's parser chain: reasoning split first, then tool calls in what is content."""

    def __init__(self, fmt: ReplyFormat):
        self._reasoning = ReasoningParser(starts_in_reasoning=fmt.starts_in_reasoning) if fmt.reasoning else None
        self._tools = fmt.tools.parser() if fmt.tools is not None else None
        self.num_tool_calls = 0

    def feed(self, text: str) -> ReplyDelta:
        if self._reasoning is None:
            return self._content(text, final=False)
        split = self._reasoning.feed(text)
        delta = self._content(split.content, final=False)
        delta.reasoning = split.reasoning
        return delta

    def finish(self) -> ReplyDelta:
        if self._reasoning is None:
            return self._content("", final=True)
        split = self._reasoning.finish()
        delta = self._content(split.content, final=True)
        delta.reasoning = split.reasoning
        return delta

    def _content(self, text: str, final: bool) -> ReplyDelta:
        if self._tools is None:
            return ReplyDelta(content=text)
        events = self._tools.feed(text) if text else []
        if final:
            events += self._tools.finish()
        delta = ReplyDelta(content="".join(e.text for e in events if isinstance(e, ContentDelta)),
                           tool_calls=[e for e in events if isinstance(e, ToolCallDelta)])
        self.num_tool_calls = max([self.num_tool_calls] + [call.index + 1 for call in delta.tool_calls])
        return delta


def parse_reply(fmt: ReplyFormat, text: str) -> Reply:
    parser = ReplyParser(fmt)
    parts = [parser.feed(text), parser.finish()]
    reasoning = "".join(p.reasoning for p in parts)
    calls = collect_events([c for p in parts for c in p.tool_calls]).tool_calls
    content = "".join(p.content for p in parts)
    return Reply(content if content or not calls else None, reasoning or None, calls)
