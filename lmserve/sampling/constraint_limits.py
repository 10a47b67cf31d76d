"""What a constraint may be before it reaches the grammar compiler: its size, and only schema
keywords the compiler enforces.

Compile time grows with a constraint's size, and faster than linearly past a point (a `choice`
of 100,000 items took 217 s), so sizes are bounded up front; the compile timeout
(compile_pool.py) catches what stays small yet compiles slowly (a long maxLength). Each limit
is several times what real schemas, choices and grammars need; what they cost to compile, at
real sizes and at the limits, is in bench/RESULTS.md ("Grammar compile limits").

xgrammar compiles some JSON schema keywords as if they were absent: their output would not
satisfy the schema the client sent, so they are refused by name instead (UNENFORCED_KEYWORDS).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any


class ConstraintLimitError(ValueError):
    """A constraint over one of GrammarLimits; the message names the limit and its value."""


@dataclass(frozen=True)
class GrammarLimits:
    max_schema_bytes: int = 256 * 2**10  # a JSON schema, or a structural tag with its schemas
    max_schema_nodes: int = 20_000  # JSON values in it (objects, arrays, strings, numbers ...)
    max_choices: int = 2_048  # items of a `choice`
    max_choice_chars: int = 32 * 2**10  # their total length
    max_regex_chars: int = 16 * 2**10
    max_grammar_bytes: int = 64 * 2**10  # a GBNF grammar
    max_grammar_rules: int = 256
    max_structural_tags: int = 256  # tags of a structural tag (one per tool)
    compile_timeout_s: float = 10.0  # one compile, in a worker process


# Keyword -> why it is refused; each was checked to be compiled as if absent (xgrammar 0.2.8,
# tests/unit/test_constraint_limits.py). Keywords whose value changes nothing are let through
# (NO_OP_VALUES, and allOf of one schema, which xgrammar does enforce).
UNENFORCED_KEYWORDS = {
    "not": "the output is not kept out of it",
    "if": "its then/else are not applied",
    "then": "it is not applied",
    "else": "it is not applied",
    "dependentSchemas": "it is not applied",
    "dependentRequired": "it is not applied",
    "dependencies": "it is not applied",
    "contains": "it is not applied",
    "minContains": "contains is not applied",
    "maxContains": "contains is not applied",
    "uniqueItems": "items may repeat",
    "allOf": "only its first schema is applied",
    "unevaluatedProperties": "it is not applied",
    "$dynamicRef": "it is not followed",
    "$recursiveRef": "it is not followed",
}
NO_OP_VALUES = {"uniqueItems": False, "unevaluatedProperties": True}
# A string's length bounds beside a pattern, or beside one of these formats, are compiled as if absent.
LENGTH_KEYWORDS = ("minLength", "maxLength")
ENFORCED_FORMATS = frozenset({"date-time", "time", "date", "duration", "email", "hostname", "ipv4", "ipv6", "uri",
                              "uri-reference", "uuid", "uri-template", "json-pointer", "relative-json-pointer"})

# Keywords whose value is a schema, a list of schemas, or a map of name -> schema; the rest
# ("enum", "const", "default", "examples" ...) hold data, whose keys are not keywords.
_SCHEMA_VALUED = frozenset({"items", "additionalProperties", "not", "if", "then", "else", "contains",
                            "propertyNames", "unevaluatedProperties", "unevaluatedItems", "additionalItems",
                            "prefixItems", "anyOf", "oneOf", "allOf"})
_SCHEMA_MAPS = frozenset({"properties", "patternProperties", "$defs", "definitions", "dependentSchemas"})

_GBNF_RULE = re.compile(r"^[ \t]*[A-Za-z_][\w.-]*[ \t]*::=", re.MULTILINE)


def check_size(kind: str, text: str, limits: GrammarLimits) -> None:
    """ConstraintLimitError if `text` (a GrammarSpec's) is over a limit of its `kind`."""
    if kind in ("json_schema", "structural_tag"):
        _check_at_most(len(text.encode()), limits.max_schema_bytes, "bytes", "max_schema_bytes")
    elif kind == "regex":
        _check_at_most(len(text), limits.max_regex_chars, "characters", "max_regex_chars")
    elif kind == "ebnf":
        _check_at_most(len(text.encode()), limits.max_grammar_bytes, "bytes", "max_grammar_bytes")
        _check_at_most(len(_GBNF_RULE.findall(text)), limits.max_grammar_rules, "rules", "max_grammar_rules")


def check_choices(choices: list[str], limits: GrammarLimits) -> None:
    _check_at_most(len(choices), limits.max_choices, "items", "max_choices")
    _check_at_most(sum(len(c) for c in choices), limits.max_choice_chars, "characters in all",
                   "max_choice_chars")


def check_document(kind: str, document: Any, limits: GrammarLimits) -> None:
    """Node and tag counts of a parsed schema or structural tag."""
    if count_nodes(document, limits.max_schema_nodes) > limits.max_schema_nodes:
        raise ConstraintLimitError(f"it has more than {limits.max_schema_nodes:,} JSON values; the limit "
                                   f"(max_schema_nodes) is {limits.max_schema_nodes:,}")
    if kind == "structural_tag":
        _check_at_most(count_tags(document), limits.max_structural_tags, "tags", "max_structural_tags")


def _check_at_most(value: int, limit: int, unit: str, name: str) -> None:
    if value > limit:
        raise ConstraintLimitError(f"it has {value:,} {unit}; the limit ({name}) is {limit:,}")


def count_nodes(value: Any, limit: int) -> int:
    """JSON values in `value`, counting stops at limit + 1."""
    count, stack = 0, [value]
    while stack and count <= limit:
        item = stack.pop()
        count += 1
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return min(count, limit + 1)


def count_tags(tag: Any) -> int:
    """Objects of type "tag" in a structural tag."""
    count, stack = 0, [tag]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            count += item.get("type") == "tag"
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return count


def unenforced_keywords(schema: Any) -> Iterator[tuple[str, str, str]]:
    """(JSON pointer, keyword, why) for each keyword in UNENFORCED_KEYWORDS used with effect, and each
    length bound beside a pattern or an enforced format, in schema positions only (a property
    named "not" is not the keyword)."""
    stack: list[tuple[str, Any]] = [("", schema)]
    while stack:
        pointer, node = stack.pop()
        if not isinstance(node, dict):
            continue
        for key, value in node.items():
            if key in UNENFORCED_KEYWORDS and _has_effect(key, value):
                yield pointer or "/", key, UNENFORCED_KEYWORDS[key]
            stack.extend(_subschemas(f"{pointer}/{_escape(key)}", key, value))
        beside = "'pattern'" if "pattern" in node else (
            f"format {node['format']!r}" if node.get("format") in ENFORCED_FORMATS else None)
        for key in LENGTH_KEYWORDS if beside else ():
            if key in node:
                yield pointer or "/", key, f"beside {beside} it is not applied"


def _has_effect(key: str, value: Any) -> bool:
    if key == "allOf":
        return not (isinstance(value, list) and len(value) <= 1)
    return key not in NO_OP_VALUES or value != NO_OP_VALUES[key]


def _subschemas(pointer: str, key: str, value: Any) -> Iterator[tuple[str, Any]]:
    if key in _SCHEMA_MAPS and isinstance(value, dict):
        yield from ((f"{pointer}/{_escape(name)}", sub) for name, sub in value.items())
    elif key in _SCHEMA_VALUED and isinstance(value, list):
        yield from ((f"{pointer}/{i}", sub) for i, sub in enumerate(value))
    elif key in _SCHEMA_VALUED:
        yield pointer, value


def _escape(key: str) -> str:
    return key.replace("~", "~0").replace("/", "~1")

