"""The tool-call formats: what each one's parser adds to ToolParser (tool_parsers.py states
the contract they all keep), and which format a model's chat template asks for."""

from __future__ import annotations

import re
from collections.abc import Callable, Collection

from lmserve.parsing.events import make_mistral_tool_call_id
from lmserve.parsing.json_call import CallObject
from lmserve.parsing.scan import is_prefix_of_any, skip_space
from lmserve.parsing.syntax import (
    HERMES_SYNTAX,
    LLAMA3_SYNTAX,
    MISTRAL_SYNTAX,
    MISTRAL_V11_SYNTAX,
    ToolCallSyntax,
)
from lmserve.parsing.tool_parsers import ParserState, ToolParser


class HermesToolParser(ToolParser):
    """Hermes / Qwen2.5 / Qwen3: `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`,
    any number of them, with content before, between and after. A missing `</tool_call>` is
    tolerated (the call ends with its JSON object), and so is one cut short at the end."""

    syntax = HERMES_SYNTAX
    _open_tags = (HERMES_SYNTAX.trigger,)  # "<tool_call>": the auto grammar takes over at the same tag
    _close_tag = "</tool_call>"

    def _step_table(self) -> dict[ParserState, Callable[[], bool]]:
        return {**super()._step_table(), ParserState.CLOSE: self._step_close}

    def _on_open_tag(self, body_start: int) -> None:
        self._rescan_pos = body_start
        self._begin_call(self._new_call(), body_start, after=ParserState.CLOSE)

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
        self._state, self._skip_space = ParserState.CONTENT, True
        return True


class Llama3JsonToolParser(ToolParser):
    """Llama 3.x JSON tool calls: the whole reply is `{"name": ..., "parameters": {...}}`,
    optionally after `<|python_tag|>`, several separated by `;`: untagged calls, read as every
    parser reads them. A reply that does not start (after whitespace) with `{`, `[{` or the tag
    is all content, streamed without delay; so is an object that is not a call of an offered
    tool (a JSON answer)."""

    syntax = LLAMA3_SYNTAX
    _content_state = ParserState.PASSTHROUGH  # no tags to look for in content
    _untagged_prefixes = ("<|python_tag|>",)


class MistralToolParser(ToolParser):
    """Mistral: content, then `[TOOL_CALLS]` and either a JSON array of call objects (v3
    tokenizers: `[TOOL_CALLS] [{"name": ..., "arguments": {...}}, ...]`) or, v11+, one
    `NAME[ARGS]{...}` per `[TOOL_CALLS]` (an optional `[CALL_ID]id` before `[ARGS]` is read and
    ignored; `NAME{...}` without `[ARGS]` is accepted). Needs the `[TOOL_CALLS]` special token
    in the text: detokenize with skip_special_tokens=False. Call ids are 9 alphanumerics, the
    only ones Mistral's templates take back."""

    syntax = MISTRAL_SYNTAX
    _open_tags = (MISTRAL_SYNTAX.trigger,)  # "[TOOL_CALLS]", as the auto grammar's trigger
    _args_tag = "[ARGS]"
    _call_id_tag = "[CALL_ID]"
    _name_pattern = re.compile(r"[A-Za-z0-9_\-.]")

    def __init__(self, id_factory: Callable[[], str] = make_mistral_tool_call_id,
                 tool_names: Collection[str] | None = None):
        super().__init__(id_factory, tool_names)
        self._name_start = 0  # where a v11 NAME begins
        self._name = ""  # that NAME, kept while its `[CALL_ID]` is skipped

    def _step_table(self) -> dict[ParserState, Callable[[], bool]]:
        return {
            **super()._step_table(),
            ParserState.CALLS_START: self._step_calls_start,
            ParserState.NAME: self._step_name,
            ParserState.CALL_ID: self._step_call_id,
        }

    def _on_open_tag(self, body_start: int) -> None:
        self._pos, self._rescan_pos, self._state = body_start, body_start, ParserState.CALLS_START

    def _step_calls_start(self) -> bool:
        start = skip_space(self._text, self._pos)
        if start == len(self._text):
            return self._final and self._drop_unfinished_call()
        ch = self._text[start]
        if ch == "[":
            self._pos, self._state = start + 1, ParserState.ARRAY_ITEM
            return True
        if self._name_pattern.match(ch):
            self._pos, self._name_start, self._state = start, start, ParserState.NAME
            return True
        return self._release()

    def _step_name(self) -> bool:
        """NAME, then `[ARGS]`, `[CALL_ID]` or `{`."""
        text, end = self._text, self._pos
        while end < len(text) and self._name_pattern.match(text[end]):
            end += 1
        self._pos = end
        marker = skip_space(text, end)
        rest = text[marker:]
        if not rest or is_prefix_of_any(rest, (self._args_tag, self._call_id_tag)):
            return self._final and self._drop_unfinished_call()
        name = text[self._name_start : end]
        if rest.startswith(self._call_id_tag):
            self._name, self._pos, self._state = name, marker + len(self._call_id_tag), ParserState.CALL_ID
            return True
        return self._begin_bare_call(name, marker)

    def _step_call_id(self) -> bool:
        """The model's own call id (ignored: ids are ours), up to `[ARGS]`."""
        text = self._text
        marker = text.find("[", self._pos)
        if marker < 0 or len(text) - marker < len(self._args_tag):
            if marker >= 0 and not self._args_tag.startswith(text[marker:]):
                return self._release()
            return self._final and self._drop_unfinished_call()
        return self._begin_bare_call(self._name, marker)

    def _begin_bare_call(self, name: str, marker: int) -> bool:
        """Begin the arguments at `marker`: `[ARGS]` then the value, or the value itself."""
        text = self._text
        args = marker + len(self._args_tag) if text.startswith(self._args_tag, marker) else marker
        if not name or text.startswith("[", args):
            return self._release()
        self._begin_call(CallObject.bare_arguments(self._emit, name), args, after=ParserState.CONTENT)
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
