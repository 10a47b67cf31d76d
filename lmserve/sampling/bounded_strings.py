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
A state costs compile time and memory, ~10 ms and ~30 kB on SmolLM2's vocabulary (more for a
larger one), so a grammar writes at most `REGEX_BUDGET` / vocabulary states this way; bounds past
that keep the repetition, with JSON's characters: right, but slow. Measured in bench/RESULTS.md
(twenty-sixth sitting) and by `python -m bench.grammar_mask`.
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
# (about 5 s of compile there, half the compile timeout).
REGEX_BUDGET = 512 * 49_152

_RULE = re.compile(r"^(\S+) ::= " + re.escape(XGRAMMAR_CHARACTER) + "$", re.MULTILINE)


def mend(text: str, vocab_size: int) -> str:
    """xgrammar's EBNF `text` with its bounded strings' characters made JSON's, and the bounds that
    fit the budget written as regex rules."""
    names = _RULE.findall(text)
    if not names:
        return text
    budget = REGEX_BUDGET // max(1, vocab_size)
    rules: dict[str, str] = {}  # regex -> its rule's name

    def mended(match: re.Match[str]) -> str:
        nonlocal budget
        low, high = int(match.group(2)), int(match.group(3))
        parts = _parts(low, high)
        new = {regex: states for regex, states, _ in parts if regex not in rules}
        if high == 0 or sum(new.values()) > budget:
            return match.group(0)
        budget -= sum(new.values())
        for regex in new:
            rules[regex] = f"json_string_{len(rules)}"
        return "(" + " ".join(rules[regex] + count for regex, _, count in parts) + ")"

    references = re.compile(rf"(?<![\w-])({'|'.join(map(re.escape, names))})\{{(\d+), (-?\d+)\}}")
    text = references.sub(mended, text).replace(XGRAMMAR_CHARACTER, JSON_CHARACTER)
    return text + "".join(f'\n{name} ::= Regex("{_quoted(f"^{regex}$")}")' for regex, name in rules.items())


def _parts(low: int, high: int) -> list[tuple[str, int, str]]:
    """(regex, its states, EBNF count after its rule) in order, for `low` to `high` JSON characters
    (`high` -1: no upper bound)."""
    c = JSON_CHARACTER_REGEX
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
