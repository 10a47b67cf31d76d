"""Split `<think>...</think>` reasoning from the reply, streamed or whole.

Whitespace follows llama.cpp (common/chat-parser.cpp, try_parse_reasoning): the reasoning is
stripped at both ends and the whitespace after `</think>` is dropped. (vLLM's deepseek_r1
parser keeps both; Qwen3's own template strips them when it renders the history.)
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass

from lmserve.parsing.scan import hold_start, skip_space


@dataclass
class ReasoningDelta:
    """What one feed()/finish() makes certain: new reasoning text and new content text."""

    reasoning: str = ""
    content: str = ""


def template_opens_reasoning(rendered_prompt: str, start: str = "<think>", end: str = "</think>") -> bool:
    """Whether the generation prompt leaves a reasoning block open (DeepSeek-R1, Qwen3-thinking
    templates end with `<think>\\n`), so the output starts inside it: starts_in_reasoning."""
    tail = rendered_prompt.rstrip()
    return tail.endswith(start) and not tail.endswith(end)


class _State(enum.Enum):
    """Where ReasoningParser is in the text."""

    START = enum.auto()  # before the first decisive character
    REASONING = enum.auto()
    CONTENT_AFTER_END = enum.auto()  # just after the closing tag: whitespace there is dropped
    CONTENT = enum.auto()


class ReasoningParser:
    """One sequence's text -> reasoning and content.

    - A reasoning block opens only at the very start of the output (after whitespace), or
      before the output when starts_in_reasoning (a leading `<think>` is then dropped too).
    - Output without a reasoning block is all content, unchanged; a later `<think>` is content.
    - An unclosed block (output cut short) is all reasoning.
    - Tags split across deltas are recognised: only a possible tag prefix (and the whitespace
      before it) is held back; finish() releases it.
    - For every chunking, the concatenated deltas equal parse(whole text) (None read as "").
    """

    def __init__(self, start: str = "<think>", end: str = "</think>", starts_in_reasoning: bool = False):
        if not start or not end:
            raise ValueError("reasoning tags must be non-empty")
        self._start, self._end = start, end
        self._starts_in_reasoning = starts_in_reasoning
        self._text = ""
        self._pos = 0
        self._final = False
        self._state = _State.START
        self._skip_space = True  # at the start of the reasoning: whitespace there is dropped
        self._delta = ReasoningDelta()
        self._steps: dict[_State, Callable[[], bool]] = {
            _State.START: self._step_start,
            _State.REASONING: self._step_reasoning,
            _State.CONTENT_AFTER_END: self._step_content_after_end,
            _State.CONTENT: self._step_content,
        }

    def feed(self, text_delta: str) -> ReasoningDelta:
        """Add generated text; returns the reasoning and content it makes certain."""
        assert not self._final, "feed() after finish()"
        self._text += text_delta
        return self._run()

    def finish(self) -> ReasoningDelta:
        """The sequence ended: release what was held back; no feed() may follow."""
        self._final = True
        return self._run()

    def parse(self, full_text: str) -> tuple[str | None, str]:
        """Non-streaming, on a fresh parser: (reasoning, or None if there is none, content)."""
        fresh = ReasoningParser(self._start, self._end, self._starts_in_reasoning)
        first, last = fresh.feed(full_text), fresh.finish()
        reasoning = first.reasoning + last.reasoning
        return reasoning or None, first.content + last.content

    def _run(self) -> ReasoningDelta:
        while self._steps[self._state]():
            pass
        delta, self._delta = self._delta, ReasoningDelta()
        return delta

    def _step_start(self) -> bool:
        begin = skip_space(self._text, 0)
        rest = self._text[begin:]
        if not self._final and self._start.startswith(rest):
            return False  # nothing decisive yet (empty, whitespace, or a partial tag)
        if rest.startswith(self._start):
            self._pos, self._state = begin + len(self._start), _State.REASONING
        else:
            self._state = _State.REASONING if self._starts_in_reasoning else _State.CONTENT
        return True

    def _step_reasoning(self) -> bool:
        text = self._text
        if self._skip_space:
            self._pos = skip_space(text, self._pos)
            self._skip_space = self._pos == len(text)
        end = text.find(self._end, self._pos)
        if end >= 0:
            self._delta.reasoning += text[self._pos : end].rstrip()
            self._pos = end + len(self._end)
            self._state = _State.CONTENT_AFTER_END
            return True
        stop = len(text) if self._final else hold_start(text, self._pos, (self._end,))
        self._delta.reasoning += text[self._pos : stop].rstrip() if self._final else text[self._pos : stop]
        self._pos = stop
        return False

    def _step_content_after_end(self) -> bool:
        self._pos = skip_space(self._text, self._pos)
        if self._pos == len(self._text):
            return False
        self._state = _State.CONTENT
        return True

    def _step_content(self) -> bool:
        self._delta.content += self._text[self._pos :]
        self._pos = len(self._text)
        return False
