"""Incremental, lenient scanning of the JSON a model writes for one tool call.

Lenient on purpose: the scanners track only strings, escapes and bracket depth, so they find
where a value ends without validating it. The arguments text is streamed exactly as the model
wrote it; whether it is valid JSON is the model's (or the grammar's) business.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Callable

from lmserve.parsing.events import Emitter

ARGUMENT_KEYS = ("arguments", "parameters")  # Hermes/Mistral say arguments, Llama 3 parameters
# The keys an untagged call may open with ("type": "function" is the OpenAI wrapper's, which
# Llama 3 models copy from the tool list; llama.cpp's JSON tool parser allows it too).
UNTAGGED_CALL_KEYS = ("name", "type", *ARGUMENT_KEYS)
_LITERAL_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789+-.")


def starts_value(ch: str) -> bool:
    """Whether `ch` can begin a JSON value."""
    return ch in '{["' or ch in _LITERAL_CHARS


class ValueScanner:
    """Finds where one JSON value ends, fed a character at a time; see push()."""

    def __init__(self, first: str):
        assert starts_value(first)
        self.kind = "container" if first in "{[" else "string" if first == '"' else "literal"
        self.done = False
        self._depth = 1 if self.kind == "container" else 0
        self._in_string = self.kind == "string"
        self._escaped = False

    def push(self, ch: str) -> bool:
        """Scan the character after the first; False when the value ended just before it
        (only literals end that way: their end shows at the first character not theirs)."""
        assert not self.done
        if self.kind == "literal":
            self.done = ch not in _LITERAL_CHARS
            return not self.done
        if self._in_string:
            self._scan_in_string(ch)
        elif ch == '"':
            self._in_string = True
        elif ch in "{[":
            self._depth += 1
        elif ch in "}]":
            self._depth -= 1
            self.done = self._depth == 0
        return True

    def _scan_in_string(self, ch: str) -> None:
        if self._escaped:
            self._escaped = False
        elif ch == "\\":
            self._escaped = True
        elif ch == '"':
            self._in_string = False
            self.done = self.kind == "string"


def normalize_arguments(raw: str) -> str:
    """The arguments text to report for a value that was buffered whole (strings, literals,
    arguments written before the name): `null` becomes "{}", a string holding a JSON object
    becomes that object's text, anything else stays as written."""
    raw = raw.strip()
    try:
        value = json.loads(raw)
    except ValueError:
        return raw
    if value is None:
        return "{}"
    if isinstance(value, str):
        inner = value.strip()
        try:
            if isinstance(json.loads(inner), dict):
                return inner
        except ValueError:
            pass
    return raw


class Step(enum.Enum):
    """What CallObject.push did with a character."""

    CONSUMED = enum.auto()  # part of the call; keep feeding
    DONE = enum.auto()  # the call's last character
    DONE_BEFORE = enum.auto()  # the call ended before this character, which is not consumed
    BAD = enum.auto()  # not a call after all (nothing was emitted): release the text


class _State(enum.Enum):
    """Where CallObject is in the call's text."""

    OPEN = enum.auto()  # before the `{`
    KEY_OR_END = enum.auto()
    KEY = enum.auto()
    COLON = enum.auto()
    VALUE_START = enum.auto()
    VALUE = enum.auto()
    COMMA_OR_END = enum.auto()
    DONE = enum.auto()  # takes no more characters


class CallObject:
    """One call written as `{"name": NAME, "arguments": ARGS}` (keys in any order, extra keys
    skipped, "parameters" accepted for "arguments"), or, with bare_arguments(), just ARGS.

    `untagged`: no tag announced the object (a model answering with bare JSON), so it is a call
    only if it reads as one from its first key on: until the commit every key is one of
    UNTAGGED_CALL_KEYS, and the object must have arguments. `tool_names`: the names a call may
    have (None: any); a call naming another is not a call.

    The call is committed (its first delta emitted) once the name is known and the arguments
    value has begun with `{` or `[`; from then on every arguments character is streamed as it
    arrives. A string, literal or early (before the name) arguments value is buffered and
    reported normalized when it ends. Before the commit any surprise is BAD (the caller gives the
    text back as content); after it, a surprise ends the call (DONE_BEFORE), so streamed deltas
    are never contradicted.
    """

    def __init__(self, emitter: Emitter, untagged: bool = False, tool_names: frozenset[str] | None = None):
        self._emitter = emitter
        self._untagged = untagged
        self._tool_names = tool_names
        self._state = _State.OPEN
        self._bare = False
        self._key: str | None = None
        self._scanner: ValueScanner | None = None
        self._value: list[str] = []
        self._streaming = False
        self._name: str | None = None
        self._args_raw: str | None = None
        self._args_seen = False
        self.committed = False
        # VALUE is scanned by _push_value (whitespace included); DONE takes no characters.
        self._handlers: dict[_State, Callable[[str], Step]] = {
            _State.OPEN: self._on_open,
            _State.KEY_OR_END: self._on_key_or_end,
            _State.KEY: self._on_key,
            _State.COLON: self._on_colon,
            _State.VALUE_START: self._on_value_start,
            _State.COMMA_OR_END: self._on_comma_or_end,
        }

    @classmethod
    def bare_arguments(cls, emitter: Emitter, name: str) -> CallObject:
        """A call whose name is already known and whose text is just the arguments value."""
        call = cls(emitter)
        call._bare, call._name, call._key, call._state = True, name, ARGUMENT_KEYS[0], _State.VALUE_START
        return call

    def push(self, ch: str) -> Step:
        """Scan the next character of the call."""
        if self._state is _State.VALUE:
            return self._push_value(ch)
        if ch.isspace() and self._state is not _State.KEY:
            return Step.CONSUMED
        return self._handlers[self._state](ch)

    @property
    def has_name(self) -> bool:
        """The name has been read (and is one the call may have)."""
        return self._name is not None

    def finish(self) -> None:
        """The text ended: complete a pending literal (`"arguments": null` cut before `}`)."""
        if self._state is _State.VALUE and self._scanner.kind == "literal":
            self._end_value()

    def _on_open(self, ch: str) -> Step:
        return self._go(_State.KEY_OR_END) if ch == "{" else self._bad()

    def _on_key_or_end(self, ch: str) -> Step:
        if ch == '"':
            self._begin_value(ch)
            return self._go(_State.KEY)
        return self._end_object() if ch == "}" else self._bad()

    def _on_key(self, ch: str) -> Step:
        self._scanner.push(ch)
        self._value.append(ch)
        if not self._scanner.done:
            return Step.CONSUMED
        try:
            self._key = json.loads("".join(self._value))
        except ValueError:
            return self._bad()
        if self._untagged and not self.committed and self._key not in UNTAGGED_CALL_KEYS:
            return self._bad()  # a JSON answer, not a call: say so before its end
        return self._go(_State.COLON)

    def _on_colon(self, ch: str) -> Step:
        return self._go(_State.VALUE_START) if ch == ":" else self._bad()

    def _on_value_start(self, ch: str) -> Step:
        if not starts_value(ch):
            return self._bad()
        self._begin_value(ch)
        if self._is_arguments_key() and self._name is not None and ch in "{[":
            self._commit(ch)  # from here on the arguments stream as they come
            self._streaming = True
        return self._go(_State.VALUE)

    def _on_comma_or_end(self, ch: str) -> Step:
        if ch == ",":
            return self._go(_State.KEY_OR_END)
        return self._end_object() if ch == "}" else self._bad()

    def _push_value(self, ch: str) -> Step:
        if not self._scanner.push(ch):
            step = self._end_value()
            return self.push(ch) if step is Step.CONSUMED else self._before(step)
        self._record(ch)
        if self._scanner.done:
            return self._end_value()
        return Step.CONSUMED

    def _end_value(self) -> Step:
        raw = "".join(self._value)
        if self._key == "name" and self._name is None:
            if not self._set_name(raw):
                return self._bad()
        elif self._is_arguments_key():
            self._args_seen = True
            if not self._streaming:
                self._args_raw = raw
                if self._name is not None:
                    self._commit(normalize_arguments(raw))
        self._streaming = False
        if self._bare:
            return self._go_done()
        return self._go(_State.COMMA_OR_END)

    def _set_name(self, raw: str) -> bool:
        try:
            name = json.loads(raw)
        except ValueError:
            return False
        if not isinstance(name, str) or not name:
            return False
        if self._tool_names is not None and name not in self._tool_names:
            return False
        self._name = name
        if self._args_raw is not None:
            self._commit(normalize_arguments(self._args_raw))
        return True

    def _end_object(self) -> Step:
        if not self.committed:
            if self._name is None or (self._untagged and not self._args_seen):
                return self._bad()
            self._commit("{}")
        return self._go_done()

    def _commit(self, arguments: str) -> None:
        if self.committed:
            return
        self.committed = True
        self._emitter.start_call(self._name)
        self._emitter.arguments(arguments)

    def _is_arguments_key(self) -> bool:
        return self._key in ARGUMENT_KEYS and not self._args_seen

    def _begin_value(self, ch: str) -> None:
        self._scanner = ValueScanner(ch)
        self._value = [ch]

    def _record(self, ch: str) -> None:
        if self._streaming:
            self._emitter.arguments(ch)
        else:
            self._value.append(ch)

    def _go(self, state: _State) -> Step:
        self._state = state
        return Step.CONSUMED

    def _go_done(self) -> Step:
        self._state = _State.DONE
        return Step.DONE

    def _bad(self) -> Step:
        self._state = _State.DONE
        return Step.DONE_BEFORE if self.committed else Step.BAD

    @staticmethod
    def _before(step: Step) -> Step:
        # The character that ended a literal belongs to whoever reads on.
        return Step.DONE_BEFORE if step is Step.DONE else step
