"""How deeply a JSON schema nests, so a schema too deep to compile is refused before it reaches the
grammar compiler.

The compiler recurses through a schema, following each `$ref` into its target as it goes: a chain
of a few thousand `$defs` that each refer to the next crashed the process (the compiler's stack),
and 3,000 took 9.5 s. Depth here counts every object and array one level, and a `$ref` to a
place in the same document ("#", "#/$defs/name") as nesting its target under it, the way the
compiler meets it. A reference back into a schema already being walked (a recursive schema, such
as a tree) adds nothing: the compiler turns it into a rule that refers to itself. The walk is
iterative and visits each value once, so a schema as large as a request body is measured in
linear time without Python's recursion limit.
"""

from __future__ import annotations

from typing import Any, Iterator
from urllib.parse import unquote

# Objects and arrays, counted through $ref. Schemas written by hand or generated from types nest
# a few dozen levels at most (each level of properties is two here: the "properties" object and
# the property's schema); 128 compiles in milliseconds.
MAX_SCHEMA_DEPTH = 128


def schema_depth(schema: Any, limit: int = MAX_SCHEMA_DEPTH) -> int:
    """The nesting depth of `schema` as described above, or a value over `limit` as soon as the walk
    goes deeper than it (the rest is not measured)."""
    if not isinstance(schema, (dict, list)):
        return 0
    done: dict[int, int] = {}  # id of a walked object or array -> its depth
    on_path = {id(schema)}
    # Each frame: the value, its children still to walk, the deepest child walked so far.
    stack: list[list[Any]] = [[schema, _children(schema, schema), 0]]
    while stack:
        frame = stack[-1]
        child = next(frame[1], None)
        if child is None:
            stack.pop()
            on_path.discard(id(frame[0]))
            done[id(frame[0])] = depth = frame[2] + 1
            if stack:
                stack[-1][2] = max(stack[-1][2], depth)
        elif id(child) in done:
            frame[2] = max(frame[2], done[id(child)])
        elif id(child) not in on_path:
            if len(stack) >= limit:
                return limit + 1
            on_path.add(id(child))
            stack.append([child, _children(child, schema), 0])
    return done[id(schema)]


def _children(value: dict | list, root: Any) -> Iterator[dict | list]:
    for item in value.values() if isinstance(value, dict) else value:
        if isinstance(item, (dict, list)):
            yield item
    if isinstance(value, dict) and isinstance(value.get("$ref"), str):
        target = _resolve(root, value["$ref"])
        if isinstance(target, (dict, list)):
            yield target


def _resolve(root: Any, ref: str) -> Any:
    """The value a same-document reference points at ("#" or "#/a/b/0"), or None."""
    if not ref.startswith("#"):
        return None
    pointer = unquote(ref[1:])
    if not pointer:
        return root
    if not pointer.startswith("/"):
        return None  # a named anchor ("#name"): not followed
    node = root
    for part in pointer[1:].split("/"):
        part = part.replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return None
    return node


def embedded_schemas(tag: Any) -> Iterator[Any]:
    """The JSON schemas a structural tag carries: each `{"type": "json_schema", "json_schema": S}`
    yields S (walking the tag iteratively; a schema's own insides are not searched)."""
    stack = [tag]
    while stack:
        value = stack.pop()
        if isinstance(value, dict) and value.get("type") == "json_schema" and "json_schema" in value:
            yield value["json_schema"]
            continue
        if isinstance(value, (dict, list)):
            stack.extend(value.values() if isinstance(value, dict) else value)
