"""Incremental tool-call parsers for the formats of the models lmserve runs.

One instance per sequence. Every parser has the same interface (ToolParser):

    events = parser.feed(text_delta)   # ContentDelta / ToolCallDelta, as soon as they are certain
    events += parser.finish()          # at the end of the sequence: everything still held back
    parser.parse(full_text)            # the same, non-streaming, on a fresh parser

Contract, for every format and every way of cutting the text into deltas:
- collect_events(all streamed events) == parse(whole text), except for the random ids.
- Content never contains any part of a real tag. Text that only starts like a tag is held back
  until it cannot be one, then released as content.
- Whitespace between content and calls is not content (the model separates calls from prose
  with newlines; clients should not see them), except that where content resumes after calls,
  the whitespace that preceded those calls separates the two pieces of content.
- A call is committed (its first delta sent) only once its name is known and its arguments have
  begun; arguments are then streamed exactly as the model writes them. Until the commit, text
  that turns out not to be a call (bad JSON, no name, output cut short) is given back as content,
  opening tag included: no text is lost. After the commit the call stands: output cut short
  leaves its arguments cut short (as OpenAI does with finish_reason "length"); text that breaks
  the JSON after the arguments ends the call and is read on as content.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable
from typing import ClassVar

from lmserve.parsing.events import (
    Emitter,
    Event,
    ParsedToolOutput,
    collect_events,
    make_tool_call_id,
)
from lmserve.parsing.json_call import CallObject, Step
from lmserve.parsing.scan import hold_start, is_prefix_of_any, skip_space
from lmserve.parsing.syntax import (
    HERMES_SYNTAX,
    LLAMA3_SYNTAX,
    MISTRAL_SYNTAX,
    MISTRAL_V11_SYNTAX,
    ToolCallSyntax,
)


class _State(enum.Enum):
    """The states of the parsers; each parser's _step_table() says which ones it uses."""

    CONTENT = enum.auto()  # all parsers
    PASSTHROUGH = enum.auto()
    CALL = enum.auto()
    CLOSE = enum.auto()  # Hermes
    START = enum.auto()  # Llama 3
    SEPARATOR = enum.auto()
    CALLS_START = enum.auto()  # Mistral
    ARRAY_ITEM = enum.auto()
    ARRAY_SEPARATOR = enum.auto()
    NAME = enum.auto()
    CALL_ID = enum.auto()


class ToolParser:
    """The shared interface and machinery: a state machine over all text fed so far.

    Each state's step method (see _step_table) consumes what it can decide and returns True if it
    made progress, False if it must wait for more text (or, after finish(), if the text is used up).
    """

    syntax: ClassVar[ToolCallSyntax]
    _initial_state: ClassVar[_State] = _State.CONTENT
    _open_tags: ClassVar[tuple[str, ...]] = ()
    _release_state: ClassVar[_State] = _State.CONTENT

    def __init__(self, id_factory: Callable[[], str] = make_tool_call_id):
        self._id_factory = id_factory
        self._emit = Emitter(id_factory)
        self._text = ""  # everything fed; kept whole so a failed call can be re-read as content
        self._pos = 0  # first character not yet decided
        self._final = False
        self._state = self._initial_state
        self._steps = self._step_table()
        self._skip_space = False  # drop whitespace at _pos (it follows a call)
        self._gap = ""  # whitespace between content and the calls after it, emitted if content resumes
        self._in_calls = False  # between a call's tag and the next content
        self._emitted_content = False
        self._call: CallObject | None = None
        self._after_call = _State.CONTENT
        self._release_pos = 0  # where the text of the uncommitted call (and its tag) begins
        self._rescan_pos = 0  # where to re-read as content if that call fails

    def feed(self, text_delta: str) -> list[Event]:
        """Add generated text; returns the events it makes certain, in order."""
        assert not self._final, "feed() after finish()"
        self._text += text_delta
        return self._run()

    def finish(self) -> list[Event]:
        """The sequence ended: resolve everything held back; no feed() may follow."""
        self._final = True
        return self._run()

    def parse(self, full_text: str) -> ParsedToolOutput:
        """Non-streaming: the whole text at once, on a fresh parser (this one is untouched)."""
        fresh = type(self)(self._id_factory)
        return collect_events(fresh.feed(full_text) + fresh.finish())

    @property
    def num_tool_calls(self) -> int:
        """Calls started so far (for finish_reason "tool_calls")."""
        return self._emit.num_calls

    def _step_table(self) -> dict[_State, Callable[[], bool]]:
        """Each state's step method; a subclass returns this updated with the states it adds."""
        return {
            _State.CONTENT: self._step_content,
            _State.PASSTHROUGH: self._step_passthrough,
            _State.CALL: self._step_call,
        }

    def _run(self) -> list[Event]:
        while self._steps[self._state]():
            pass
        return self._emit.take()

    # --- content with tags -----------------------------------------------------------------

    def _step_content(self) -> bool:
        """Plain text until one of the opening tags; holds back a possible partial tag."""
        text = self._text
        if self._skip_space:
            self._pos = skip_space(text, self._pos)
            if self._pos == len(text):
                return False
            self._skip_space = False
        found = [(i, tag) for tag in self._open_tags if (i := text.find(tag, self._pos)) >= 0]
        if found:
            start, tag = min(found)
            self._content_until_tag(start)
            self._on_open_tag(start + len(tag))
            return True
        end = len(text) if self._final else hold_start(text, self._pos, self._open_tags)
        self._content(text[self._pos : end])
        self._pos = end
        return False

    def _content_until_tag(self, tag_start: int) -> None:
        before = self._text[self._pos : tag_start].rstrip()
        self._content(before)
        if self._emitted_content and not self._in_calls:
            self._gap = self._text[self._pos + len(before) : tag_start]
        self._in_calls = True
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
        self._content(self._text[self._pos :])
        self._pos = len(self._text)
        return False

    # --- one call --------------------------------------------------------------------------

    def _begin_call(self, call: CallObject, pos: int, after: _State) -> None:
        self._call, self._pos, self._after_call, self._state = call, pos, after, _State.CALL

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
            return self._release()
        self._state = self._after_call
        return True

    def _release(self) -> bool:
        """The uncommitted call was not one: its text so far is content after all."""
        self._content(self._text[self._release_pos : self._rescan_pos])
        self._pos, self._state, self._skip_space = self._rescan_pos, self._release_state, False
        return True

    def _new_call(self, require_arguments: bool = False) -> CallObject:
        return CallObject(self._emit, require_arguments)


class HermesToolParser(ToolParser):
    """Hermes / Qwen2.5 / Qwen3: `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`,
    any number of them, with content before, between and after. A missing `</tool_call>` is
    tolerated (the call ends with its JSON object), and so is one cut short at the end."""

    syntax = HERMES_SYNTAX
    _open_tags = (HERMES_SYNTAX.trigger,)  # "<tool_call>": the auto grammar takes over at the same tag
    _close_tag = "</tool_call>"

    def _step_table(self) -> dict[_State, Callable[[], bool]]:
        return {**super()._step_table(), _State.CLOSE: self._step_close}

    def _on_open_tag(self, body_start: int) -> None:
        self._rescan_pos = body_start
        self._begin_call(self._new_call(), body_start, after=_State.CLOSE)

    def _step_close(self) -> bool:
        """After a call's JSON: whitespace, then (normally) the closing tag."""
        self._pos = skip_space(self._text, self._pos)
        rest = self._text[self._pos :]
        if rest.startswith(self._close_tag):
            self._pos += len(self._close_tag)
        elif self._close_tag.startswith(rest):
            if not self._final:
                return False
            self._pos = len(self._text)  # output cut inside the closing tag: still not content
        self._state, self._skip_space = _State.CONTENT, True
        return True


class Llama3JsonToolParser(ToolParser):
    """Llama 3.x JSON tool calls: the whole reply is `{"name": ..., "parameters": {...}}`,
    optionally after `<|python_tag|>`, several separated by `;`. A reply that does not start
    (after whitespace) with `{` or the tag is all content, streamed without delay. An object
    without a name and parameters/arguments is content too (a JSON answer, not a call)."""

    syntax = LLAMA3_SYNTAX
    _initial_state = _State.START
    _release_state = _State.PASSTHROUGH
    _python_tag = "<|python_tag|>"

    def _step_table(self) -> dict[_State, Callable[[], bool]]:
        return {**super()._step_table(), _State.START: self._step_start, _State.SEPARATOR: self._step_separator}

    def _step_start(self) -> bool:
        return self._try_call_at(skip_space(self._text, self._pos), fallback=self._pos)

    def _step_separator(self) -> bool:
        """After a call: whitespace, an optional `;`, then another call or trailing text."""
        text = self._text
        end = skip_space(text, self._pos)
        if end < len(text) and text[end] == ";":
            after = skip_space(text, end + 1)
            if after == len(text) and self._final:
                self._pos = after  # a trailing separator is not content
                return True
            return self._try_call_at(after, fallback=end)
        return self._try_call_at(end, fallback=end)

    def _try_call_at(self, start: int, fallback: int) -> bool:
        """Begin a call at `start` if one begins there; else content from `fallback` on."""
        rest = self._text[start:]
        if not rest and not self._final:
            return False
        if rest.startswith("{") or rest.startswith(self._python_tag):
            body = start if rest.startswith("{") else start + len(self._python_tag)
            self._release_pos, self._rescan_pos = self._pos, self._pos
            self._begin_call(self._new_call(require_arguments=True), body, after=_State.SEPARATOR)
            return True
        if rest and not self._final and self._python_tag.startswith(rest):
            return False
        self._pos, self._state = fallback, _State.PASSTHROUGH
        return True


class MistralToolParser(ToolParser):
    """Mistral: content, then `[TOOL_CALLS]` and either a JSON array of call objects (v3
    tokenizers: `[TOOL_CALLS] [{"name": ..., "arguments": {...}}, ...]`) or, v11+, one
    `NAME[ARGS]{...}` per `[TOOL_CALLS]` (an optional `[CALL_ID]id` before `[ARGS]` is read and
    ignored; `NAME{...}` without `[ARGS]` is accepted). Needs the `[TOOL_CALLS]` special token
    in the text: detokenize with skip_special_tokens=False."""

    syntax = MISTRAL_SYNTAX
    _open_tags = (MISTRAL_SYNTAX.trigger,)  # "[TOOL_CALLS]", as the auto grammar's trigger
    _args_tag = "[ARGS]"
    _call_id_tag = "[CALL_ID]"
    _name_pattern = re.compile(r"[A-Za-z0-9_\-.]")

    def __init__(self, id_factory: Callable[[], str] = make_tool_call_id):
        super().__init__(id_factory)
        self._name_start = 0  # where a v11 NAME begins
        self._name = ""  # that NAME, kept while its `[CALL_ID]` is skipped

    def _step_table(self) -> dict[_State, Callable[[], bool]]:
        return {
            **super()._step_table(),
            _State.CALLS_START: self._step_calls_start,
            _State.ARRAY_ITEM: self._step_array_item,
            _State.ARRAY_SEPARATOR: self._step_array_separator,
            _State.NAME: self._step_name,
            _State.CALL_ID: self._step_call_id,
        }

    def _on_open_tag(self, body_start: int) -> None:
        self._pos, self._rescan_pos, self._state = body_start, body_start, _State.CALLS_START

    def _step_calls_start(self) -> bool:
        start = skip_space(self._text, self._pos)
        if start == len(self._text):
            return self._final and self._release()
        ch = self._text[start]
        if ch == "[":
            self._pos, self._state = start + 1, _State.ARRAY_ITEM
            return True
        if self._name_pattern.match(ch):
            self._pos, self._name_start, self._state = start, start, _State.NAME
            return True
        return self._release()

    def _step_array_item(self) -> bool:
        start = skip_space(self._text, self._pos)
        if start == len(self._text):
            return self._final and self._release()
        ch = self._text[start]
        if ch == "]":
            self._pos, self._state, self._skip_space = start + 1, _State.CONTENT, True
            return True
        if ch != "{":
            return self._release()
        self._begin_call(self._new_call(), start, after=_State.ARRAY_SEPARATOR)
        return True

    def _step_array_separator(self) -> bool:
        text = self._text
        start = skip_space(text, self._pos)
        if start == len(text) and not self._final:
            return False
        if start < len(text) and text[start] == ",":
            self._release_pos = self._rescan_pos = self._pos  # a failed next item is content
            self._pos, self._state = start + 1, _State.ARRAY_ITEM
            return True
        if start < len(text) and text[start] == "]":
            start += 1
        self._pos, self._state, self._skip_space = start, _State.CONTENT, True
        return True

    def _step_name(self) -> bool:
        """NAME, then `[ARGS]`, `[CALL_ID]` or `{`."""
        text, end = self._text, self._pos
        while end < len(text) and self._name_pattern.match(text[end]):
            end += 1
        self._pos = end
        marker = skip_space(text, end)
        rest = text[marker:]
        if not rest or (not self._final and is_prefix_of_any(rest, (self._args_tag, self._call_id_tag))):
            return self._final and self._release()
        name = text[self._name_start : end]
        if rest.startswith(self._call_id_tag):
            self._name, self._pos, self._state = name, marker + len(self._call_id_tag), _State.CALL_ID
            return True
        return self._begin_bare_call(name, marker)

    def _step_call_id(self) -> bool:
        """The model's own call id (ignored: ids are ours), up to `[ARGS]`."""
        text = self._text
        marker = text.find("[", self._pos)
        if marker < 0 or len(text) - marker < len(self._args_tag):
            if marker >= 0 and not self._args_tag.startswith(text[marker:]):
                return self._release()
            return self._final and self._release()
        return self._begin_bare_call(self._name, marker)

    def _begin_bare_call(self, name: str, marker: int) -> bool:
        """Begin the arguments at `marker`: `[ARGS]` then the value, or the value itself."""
        text = self._text
        args = marker + len(self._args_tag) if text.startswith(self._args_tag, marker) else marker
        if not name or text.startswith("[", args):
            return self._release()
        self._begin_call(CallObject.bare_arguments(self._emit, name), args, after=_State.CONTENT)
        self._skip_space = True
        return True


def tool_parser_for(chat_template: str | None) -> type[ToolParser]:
    """The parser for the format the model was trained to call tools in, read from what its chat
    template writes; Hermes by default (it is also the format tools_system_prompt teaches
    templates that know no tools)."""
    template = chat_template or ""
    if "<tool_call>" in template:
        return HermesToolParser
    if "[TOOL_CALLS]" in template:
        return MistralToolParser
    if "<|python_tag|>" in template or "ipython" in template:
        return Llama3JsonToolParser
    return HermesToolParser


def tool_call_syntax_for(chat_template: str | None) -> ToolCallSyntax:
    """The syntax a grammar should produce for this model: its parser's, except that Mistral
    templates writing `[ARGS]` are v11+ (one `[TOOL_CALLS]NAME[ARGS]{...}` per call)."""
    parser_cls = tool_parser_for(chat_template)
    if parser_cls is MistralToolParser and "[ARGS]" in (chat_template or ""):
        return MISTRAL_V11_SYNTAX
    return parser_cls.syntax
