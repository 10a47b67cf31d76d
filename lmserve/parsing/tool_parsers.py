"""Incremental tool-call parsers for the formats of the models lmserve runs (tool_formats.py).

One instance per sequence. Every parser has the same interface (ToolParser):

    events = parser.feed(text_delta)   # ContentDelta / ToolCallDelta, as soon as they are certain
    events += parser.finish()          # at the end of the sequence: everything still held back
    parser.parse(full_text)            # the same, non-streaming, on a fresh parser

Contract, for every format and every way of cutting the text into deltas:
- collect_events(all streamed events) == parse(whole text), except for the random ids.
- Content never contains any part of a real tag. Text that only starts like a tag is held back
  until it cannot be one, then released as content; at the end of output that max_tokens cut
  (finish(truncated=True)) it is dropped, as the start of the model's next call.
- Whitespace between content and calls is not content (the model separates calls from prose
  with newlines; clients should not see them), except that where content resumes after calls,
  the whitespace that preceded those calls separates the two pieces of content.
- Untagged calls: a reply that is, from its start (after whitespace), a JSON call object, several
  separated by `;` or newlines, or an array of them, is calls, in every format (Qwen2.5 and
  Llama 3 models answer so under tool_choice "auto", skipping their template's tags). Such an
  object must name an offered tool and have arguments, and is held back only while it can still
  be one: its first key that is not a call's, or a name not offered, gives it back as content.
- A call is committed (its first delta sent) only once its name is known and its arguments have
  begun; arguments are then streamed exactly as the model writes them. Until the commit, text
  that turns out not to be a call (bad JSON, no name, a name not offered) is given back as
  content, opening tag included: no text is lost. Output cut short (max_tokens) before the
  commit drops the call: its markup is never content (only an untagged object whose name is
  still unread is given back, as it may be a JSON answer). After the commit the call stands:
  output cut short leaves its arguments cut short (as OpenAI does with finish_reason "length");
  text that breaks the JSON after the arguments ends the call and is read on as content.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Collection
from typing import ClassVar

from lmserve.parsing.events import (
    Emitter,
    Event,
    ParsedToolOutput,
    collect_events,
    make_tool_call_id,
)
from lmserve.parsing.json_call import CallObject, Step
from lmserve.parsing.scan import hold_start, is_prefix_of_any, partial_tag_start, skip_space
from lmserve.parsing.syntax import ToolCallSyntax


class ParserState(enum.Enum):
    """The states of the parsers; each parser's _step_table() says which ones it uses."""

    START = enum.auto()  # all parsers
    CONTENT = enum.auto()
    PASSTHROUGH = enum.auto()
    CALL = enum.auto()
    SEPARATOR = enum.auto()  # between untagged calls
    ARRAY_ITEM = enum.auto()  # in an array of calls
    ARRAY_SEPARATOR = enum.auto()
    CLOSE = enum.auto()  # Hermes
    CALLS_START = enum.auto()  # Mistral
    NAME = enum.auto()
    CALL_ID = enum.auto()


class ToolParser:
    """The shared interface and machinery: a state machine over all text fed so far.

    Each state's step method (see _step_table) consumes what it can decide and returns True if it
    made progress, False if it must wait for more text (or, after finish(), if the text is used up).
    `tool_names` are the offered tools (None: any name); an untagged call must name one of them.
    """

    syntax: ClassVar[ToolCallSyntax]
    _open_tags: ClassVar[tuple[str, ...]] = ()
    _content_state: ClassVar[ParserState] = ParserState.CONTENT  # where text that is no call is read
    _untagged_prefixes: ClassVar[tuple[str, ...]] = ()  # may come before an untagged call

    def __init__(self, id_factory: Callable[[], str] = make_tool_call_id,
                 tool_names: Collection[str] | None = None):
        self._id_factory = id_factory
        self._tool_names = frozenset(tool_names) if tool_names is not None else None
        self._emit = Emitter(id_factory)
        self._text = ""  # everything fed; kept whole so a failed call can be re-read as content
        self._pos = 0  # first character not yet decided
        self._final = False
        self._truncated = False  # the output was cut off (max_tokens), not ended by the model
        self._state = ParserState.START
        self._steps = self._step_table()
        self._skip_space = False  # drop whitespace at _pos (it follows a call)
        self._gap = ""  # whitespace between content and the calls after it, emitted if content resumes
        self._in_calls = False  # between a call's tag and the next content
        self._emitted_content = False
        self._untagged = False  # the calls being read are bare JSON at the start of the reply
        self._call: CallObject | None = None
        self._after_call = ParserState.CONTENT
        self._release_pos = 0  # where the text of the uncommitted call (and its tag) begins
        self._rescan_pos = 0  # where to re-read as content if that call fails

    def feed(self, text_delta: str) -> list[Event]:
        """Add generated text; returns the events it makes certain, in order."""
        assert not self._final, "feed() after finish()"
        self._text += text_delta
        return self._run()

    def finish(self, truncated: bool = False) -> list[Event]:
        """The sequence ended: resolve everything held back; no feed() may follow. `truncated`:
        max_tokens cut it (finish_reason "length"), so a partial tag at its end is dropped."""
        self._final, self._truncated = True, truncated
        return self._run()

    def parse(self, full_text: str, truncated: bool = False) -> ParsedToolOutput:
        """Non-streaming: the whole text at once, on a fresh parser (this one is untouched)."""
        fresh = type(self)(self._id_factory, self._tool_names)
        return collect_events(fresh.feed(full_text) + fresh.finish(truncated))

    @property
    def num_tool_calls(self) -> int:
        """Calls started so far (for finish_reason "tool_calls")."""
        return self._emit.num_calls

    def _step_table(self) -> dict[ParserState, Callable[[], bool]]:
        """Each state's step method; a subclass returns this updated with the states it adds."""
        return {
            ParserState.START: self._step_start,
            ParserState.CONTENT: self._step_content,
            ParserState.PASSTHROUGH: self._step_passthrough,
            ParserState.CALL: self._step_call,
            ParserState.SEPARATOR: self._step_separator,
            ParserState.ARRAY_ITEM: self._step_array_item,
            ParserState.ARRAY_SEPARATOR: self._step_array_separator,
        }

    def _run(self) -> list[Event]:
        while self._steps[self._state]():
            pass
        return self._emit.take()

    # --- untagged calls: a reply that is bare JSON -------------------------------------------

    def _step_start(self) -> bool:
        """The reply's first characters: a call object or an array of them (untagged calls), or
        anything else, read as content. Only leading whitespace and `[` wait for more text."""
        start = skip_space(self._text, self._pos)
        if self._text.startswith("[", start):
            return self._try_untagged_array(start)
        return self._try_untagged_call(start, fallback=self._pos)

    def _try_untagged_array(self, start: int) -> bool:
        """`[` at `start` opens an array of untagged calls if `{` follows; else all is content."""
        text = self._text
        item = skip_space(text, start + 1)
        if item == len(text) and not self._final:
            return False
        if item < len(text) and text[item] == "{":
            self._untagged, self._release_pos, self._rescan_pos = True, self._pos, self._pos
            self._pos, self._state = start + 1, ParserState.ARRAY_ITEM
        else:
            self._state = self._content_state
        return True

    def _step_separator(self) -> bool:
        """After an untagged call: whitespace, an optional `;`, then another call or text."""
        text = self._text
        end = skip_space(text, self._pos)
        if end < len(text) and text[end] == ";":
            after = skip_space(text, end + 1)
            if after == len(text) and self._final:
                self._pos = after  # a trailing separator is not content
                return True
            return self._try_untagged_call(after, fallback=end)
        return self._try_untagged_call(end, fallback=end)

    def _try_untagged_call(self, start: int, fallback: int) -> bool:
        """Begin a call at `start` if one may begin there; else content from `fallback` on."""
        rest = self._text[start:]
        if not self._final and (not rest or is_prefix_of_any(rest, self._untagged_prefixes)):
            return False
        prefix = next((p for p in self._untagged_prefixes if rest.startswith(p)), "")
        if rest.startswith("{") or prefix:
            self._untagged, self._release_pos, self._rescan_pos = True, fallback, fallback
            self._begin_call(self._new_call(), start + len(prefix), after=ParserState.SEPARATOR)
            return True
        self._pos, self._state = fallback, self._content_state
        return True

    # --- content with tags -----------------------------------------------------------------

    def _step_content(self) -> bool:
        """Plain text until one of the opening tags; holds back a possible partial tag."""
        text = self._text
        if not self._skip_pending_space():
            return False
        found = [(i, tag) for tag in self._open_tags if (i := text.find(tag, self._pos)) >= 0]
        if found:
            start, tag = min(found)
            self._content_until_tag(start)
            self._on_open_tag(start + len(tag))
            return True
        end = self._content_end()
        self._content(text[self._pos : end])
        self._pos = len(text) if self._final else end  # truncated: a partial tag is dropped
        return False

    def _content_end(self) -> int:
        """Where certain content ends: before a possible partial tag at the end (and the
        whitespace before it); once the output ended, at its end, unless max_tokens cut it
        inside a tag (the model's next call, never content)."""
        text = self._text
        if self._final and not (self._truncated and self._ends_in_partial_tag()):
            return len(text)
        return hold_start(text, self._pos, self._open_tags)

    def _ends_in_partial_tag(self) -> bool:
        return partial_tag_start(self._text, self._pos, self._open_tags) < len(self._text)

    def _skip_pending_space(self) -> bool:
        """Drop the whitespace after calls; False while there is nothing else yet."""
        if self._skip_space:
            self._pos = skip_space(self._text, self._pos)
            if self._pos == len(self._text):
                return False
            self._skip_space = False
        return True

    def _content_until_tag(self, tag_start: int) -> None:
        before = self._text[self._pos : tag_start].rstrip()
        self._content(before)
        if self._emitted_content and not self._in_calls:
            self._gap = self._text[self._pos + len(before) : tag_start]
        self._in_calls, self._untagged = True, False
        self._release_pos = tag_start

    def _content(self, text: str) -> None:
        """Emit content; if it resumes after calls, first the whitespace that preceded them."""
        if text:
            self._emit.content(self._gap + text)
            self._gap, self._in_calls, self._emitted_content = "", False, True

    def _on_open_tag(self, body_start: int) -> None:
        raise NotImplementedError

    def _step_passthrough(self) -> bool:
        """Everything from here on is content."""
        if not self._skip_pending_space():
            return False
        self._content(self._text[self._pos :])
        self._pos = len(self._text)
        return False

    # --- arrays of calls (`[TOOL_CALLS][...]`, or an untagged reply) -----------------------

    def _step_array_item(self) -> bool:
        start = skip_space(self._text, self._pos)
        if start == len(self._text):
            return self._final and self._drop_unfinished_call()
        ch = self._text[start]
        if ch == "]":
            self._pos, self._state, self._skip_space = start + 1, self._content_state, True
            return True
        if ch != "{":
            return self._release()
        self._begin_call(self._new_call(), start, after=ParserState.ARRAY_SEPARATOR)
        return True

    def _step_array_separator(self) -> bool:
        text = self._text
        start = skip_space(text, self._pos)
        if start == len(text) and not self._final:
            return False
        if start < len(text) and text[start] == ",":
            self._release_pos = self._rescan_pos = self._pos  # a failed next item is content
            self._pos, self._state = start + 1, ParserState.ARRAY_ITEM
            return True
        if start < len(text) and text[start] == "]":
            start += 1
        self._pos, self._state, self._skip_space = start, self._content_state, True
        return True

    # --- one call --------------------------------------------------------------------------

    def _begin_call(self, call: CallObject, pos: int, after: ParserState) -> None:
        self._call, self._pos, self._after_call, self._state = call, pos, after, ParserState.CALL

    def _step_call(self) -> bool:
        text, call = self._text, self._call
        while self._pos < len(text):
            step = call.push(text[self._pos])
            if step is Step.BAD:
                return self._release()
            if step is not Step.DONE_BEFORE:
                self._pos += 1
            if step is not Step.CONSUMED:
                self._state = self._after_call
                return True
        if not self._final:
            return False
        call.finish()
        if not call.committed:
            return self._drop_unfinished_call()
        self._state = self._after_call
        return True

    def _release(self) -> bool:
        """The uncommitted call was not one: its text so far is content after all."""
        self._content(self._text[self._release_pos : self._rescan_pos])
        self._pos, self._state, self._skip_space = self._rescan_pos, self._content_state, False
        return True

    def _drop_unfinished_call(self) -> bool:
        """The output ended inside a call not yet committed (max_tokens): the call is dropped, its
        markup never shown as content. Only an untagged reply not yet known to be a call (no
        call before it, its name unread) is given back as content."""
        known = not self._untagged or self.num_tool_calls > 0 or (self._call is not None and self._call.has_name)
        if not known:
            return self._release()
        self._pos, self._state = len(self._text), self._content_state
        return True

    def _new_call(self) -> CallObject:
        if self._untagged:
            return CallObject(self._emit, untagged=True, tool_names=self._tool_names)
        return CallObject(self._emit)
