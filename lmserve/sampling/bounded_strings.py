"""JSON strings with minLength or maxLength, rewritten in the grammar text xgrammar makes of a schema
(or of a structural tag's schemas).

xgrammar (0.2.8 and 0.2.9) writes such a string as `"\"" chars{lo, hi} "\""`, where `chars` is any
character but a quote, a backslash, CR and LF. That is wrong twice over:
- raw control characters get in, which is not JSON (a sampled "\x00" was seen), and escapes do not;
- a counted repetition is slow to mask: each token inside the string costs the matcher a pass over
  the vocabulary, ~18 ms a row on SmolLM2's 49k tokens (its issue #852), against microseconds in
  an unbounded string; with JSON's characters (a class or an escape) and a bound over 128, about
  a second a row. One such row held every sequence in its batch to about a token a second.

Here the characters become a JSON string's (anything but a control character, a quote or a
backslash, or an escape, which counts as one character), written as regex rules, which xgrammar
compiles into states that each hold a precomputed mask:
- a bound of at most 128 (xgrammar unrolls a regex count up to that) is one regex, a state a
  character: a row's mask fills in microseconds;
- a longer bound repeats an exact chunk of CHUNK characters, then a regex for the rest: a few
  states whatever the bound (compile time and memory stay small), and a fill costs about a
  millisecond on average, more at a chunk's end, where tokens that cross it are parsed one by one.
A schema's `pattern` that is one atom under a count past 128 (`^[a-z ]{0,300}$`: 8.5 ms a row as
xgrammar writes it) is chunked the same way, with its own atom. A state costs compile time and
memory, ~10 ms and ~30 kB on SmolLM2's vocabulary (more for a larger one), so a grammar writes
at most `REGEX_BUDGET` / vocabulary states this way; bounds past that keep their slow form.
Measured in bench/RESULTS.md (twenty-sixth sitting) and by `python -m bench.grammar_mask`.
"""

from __future__ import annotations

import re

# How xgrammar writes a bounded string's character rule, and a JSON string's character in its EBNF.
XGRAMMAR_CHARACTER = '(([^\\"\\\\\\r\\n]))'
JSON_CHARACTER = '(([^\\0-\\x1f\\"\\\\]) | ("\\\\" basic_escape))'
# A JSON string's character as a regex over the text the model writes.
JSON_CHARACTER_REGEX = r'([^\x00-\x1f"\\]|\\(["\\/bfnrt]|u[0-9a-fA-F]{4}))'

UNROLLED = 128  # the longest regex count xgrammar unrolls into states; above it, a slow repetition
CHUNK = 64  # characters of the exact chunk a longer bound repeats
# Regex states one grammar may write, times the vocabulary's size: 512 on SmolLM2's 49,152 tokens
# (five distinct bounds of 80-120 characters, 500 states, compiled in 4.6 s: as long as xgrammar's
# own form of them takes, which also sends back a grammar four times the size; bench/RESULTS.md).
REGEX_BUDGET = 512 * 49_152

_RULE = re.compile(r"^(\S+) ::= " + re.escape(XGRAMMAR_CHARACTER) + "$", re.MULTILINE)
# A regex rule as xgrammar prints a schema's `pattern`, and a regex that is one atom (a class, an
# escaped character, `.` or a character) under one count: what a long-counted pattern usually is.
_REGEX_RULE = re.compile(r'^(\S+) ::= Regex\("((?:[^"\\]|\\.)*)"(, json_string=true)?\)$', re.MULTILINE)
_COUNTED_ATOM = re.compile(r"(\[(?:\\.|[^\]\\])+\]|\\[^ux0-9]|[^\\\[\](){}|*+?^$])\{(\d+)(?:(,)(\d*))?\}")


class _Rules:
    """Regex rules written into one grammar, within its budget of states."""

    def __init__(self, vocab_size: int):
        self.budget = REGEX_BUDGET // max(1, vocab_size)
        self.names: dict[tuple[str, str], str] = {}  # (regex, flag) -> its rule's name

    def write(self, parts: list[tuple[str, int, str]], flag: str = "") -> str | None:
        """EBNF for `parts` (_parts'), its new rules added; None past the budget."""
        new = {regex: states for regex, states, _ in parts if (regex, flag) not in self.names}
        if sum(new.values()) > self.budget:
            return None
        self.budget -= sum(new.values())
        for regex in new:
            self.names[regex, flag] = f"bounded_{len(self.names)}"
        return "(" + " ".join(self.names[regex, flag] + count for regex, _, count in parts) + ")"

    def text(self) -> str:
        return "".join(f'\n{name} ::= Regex("{_quoted(f"^{regex}$")}"{flag})'
                       for (regex, flag), name in self.names.items())


def mend(text: str, vocab_size: int) -> str:
    """xgrammar's EBNF `text` with its bounded strings' characters made JSON's, and the bounds (and
    patterns that are one atom under a count past UNROLLED) that fit the budget written as regex rules."""
    rules = _Rules(vocab_size)
    names = _RULE.findall(text)
    if names:
        def mended(match: re.Match[str]) -> str:
            low, high = int(match.group(2)), int(match.group(3))
            written = rules.write(_parts(low, high))
            return match.group(0) if written is None else written

        references = re.compile(rf"(?<![\w-])({'|'.join(map(re.escape, names))})\{{(\d+), (-?\d+)\}}")
        text = references.sub(mended, text).replace(XGRAMMAR_CHARACTER, JSON_CHARACTER)

    def counted(match: re.Match[str]) -> str:
        regex = _unquoted(match.group(2))
        if not (regex.startswith("^") and regex.endswith("$")):
            return match.group(0)  # a pattern matched anywhere in the string: left as it is
        parts = _counted_parts(regex[1:-1])
        written = None if parts is None else rules.write(parts, match.group(3) or "")
        return match.group(0) if written is None else f"{match.group(1)} ::= {written}"

    text = _REGEX_RULE.sub(counted, text)
    return text + rules.text()


def _counted_parts(regex: str) -> list[tuple[str, int, str]] | None:
    """_parts for `regex` if it is one atom under a count past UNROLLED, else None. (A `regex`
    constraint needs none: xgrammar writes its counted classes as repetitions, which it masks fast.)"""
    match = _COUNTED_ATOM.fullmatch(regex)
    if match is None:
        return None
    atom, low = match.group(1), int(match.group(2))
    high = low if match.group(3) is None else (int(match.group(4)) if match.group(4) else -1)
    if max(low, high) <= UNROLLED or 0 <= high < low:
        return None
    return _parts(low, high, atom)


def _parts(low: int, high: int, c: str = JSON_CHARACTER_REGEX) -> list[tuple[str, int, str]]:
    """(regex, its states, EBNF count after its rule) in order, for `low` to `high` of the atom `c`
    (JSON string characters by default; `high` -1: no upper bound)."""
    chunk = (f"{c}{{{CHUNK}}}", CHUNK)
    chunks, low = divmod(low, CHUNK) if low > UNROLLED else (0, low)
    parts = [(*chunk, f"{{{chunks}, {chunks}}}")] if chunks else []
    if high < 0:
        return [*parts, (f"{c}{{{low}}}{c}*" if low else f"{c}*", low + 1, "")]
    high -= chunks * CHUNK
    if high <= UNROLLED:
        return [*parts, (f"{c}{{{low},{high}}}", high, "")]
    whole, rest = divmod(high - low, CHUNK)  # the last regex: fewer than 2 * CHUNK characters
    return [*parts, *([(f"{c}{{{low}}}", low, "")] if low else []), (*chunk, f"{{0, {whole - 1}}}"),
            (f"{c}{{0,{CHUNK + rest}}}", CHUNK + rest, "")]


def _quoted(regex: str) -> str:
    """`regex` as an EBNF string literal's contents."""
    return regex.replace("\\", "\\\\").replace('"', '\\"')


def _unquoted(literal: str) -> str:
    """An EBNF string literal's contents as the regex they spell."""
    return re.sub(r'\\([\\"])', r"\1", literal)
