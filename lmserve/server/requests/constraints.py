"""Output constraints in a request -> one GrammarSpec, compiled once here so a bad one is a 400.

Accepted spellings: OpenAI's `response_format` (json_object, json_schema with `strict`), and the
extensions llama.cpp (`grammar`, `json_schema`) and vLLM (`guided_*`, `structured_outputs`) users
send, plus the short `regex` and `choice`. At most one may be given.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from lmserve.request import GrammarSpec
from lmserve.server.errors import bad_request, unsupported
from lmserve.server.protocol import ResponseFormat, SamplingFields, StructuredOutputs

if TYPE_CHECKING:
    from lmserve.sampling.grammar import GrammarCompiler, RequestCompiler


def grammar_spec(request: SamplingFields, compiler: GrammarCompiler | RequestCompiler | None) -> GrammarSpec | None:
    """The request's single output constraint, checked to compile; None when it has none."""
    found = requested_constraints(request)
    if not found:
        return None
    if len(found) > 1:
        names = ", ".join(param for param, _ in found)
        raise bad_request(f"give at most one output constraint; this request has {names}", param=found[1][0])
    param, spec = found[0]
    check_compiles(spec, compiler, param)
    return spec


def check_compiles(spec: GrammarSpec, compiler: GrammarCompiler | RequestCompiler | None, param: str,
                   feature: str = "constrained decoding", context: str = "") -> None:
    """400 naming `param` if `spec` does not compile, is over a limit or allows no output (the
    compiled grammar stays cached for the engine); `feature` names what an engine without a
    compiler does not support."""
    if compiler is None:
        raise unsupported(param, f"{feature} on this model")
    # Here, not at the top: the compiler's module imports torch, and `lmserve serve` plans its
    # sampling defaults as a request's fields before it imports torch (sampling_defaults.py).
    from lmserve.sampling.grammar import GrammarError

    try:
        compiler.compile(spec)
    except GrammarError as exc:
        raise bad_request(f"{param}: {context}{exc}", param=param) from None


def requested_constraints(request: SamplingFields) -> list[tuple[str, GrammarSpec]]:
    """(param name, spec) for every constraint field the request sets."""
    found = []
    if request.response_format is not None:
        spec = _response_format(request.response_format)
        if spec is not None:
            found.append(("response_format", spec))
    plain = {
        "grammar": _ebnf(request.grammar),
        "json_schema": _schema(request.json_schema, "json_schema"),
        "regex": _regex(request.regex),
        "choice": _choice(request.choice, "choice"),
        "guided_json": _schema(request.guided_json, "guided_json"),
        "guided_regex": _regex(request.guided_regex),
        "guided_choice": _choice(request.guided_choice, "guided_choice"),
        "guided_grammar": _ebnf(request.guided_grammar),
    }
    found += [(param, spec) for param, spec in plain.items() if spec is not None]
    if request.structured_outputs is not None:
        found += _structured_outputs(request.structured_outputs)
    return found


def _response_format(fmt: ResponseFormat) -> GrammarSpec | None:
    if fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return _schema(fmt.schema_, "response_format.schema") or GrammarSpec("json_object")
    if fmt.type == "json_schema":
        if fmt.json_schema is None:
            raise bad_request("response_format of type 'json_schema' needs a 'json_schema' object",
                              param="response_format.json_schema")
        schema = fmt.json_schema.schema_
        if schema is None:  # OpenAI allows it: any JSON object
            return GrammarSpec("json_object")
        return _schema(schema, "response_format.json_schema.schema", strict=bool(fmt.json_schema.strict))
    if fmt.type == "structural_tag":
        return GrammarSpec("structural_tag", json.dumps({"type": "structural_tag", "format": _tag_format(fmt)}))
    raise unsupported("response_format.type", f"response_format type {fmt.type!r} (use 'text', 'json_object', "
                      "'json_schema' or 'structural_tag')")


def _tag_format(fmt: ResponseFormat) -> dict[str, Any]:
    """xgrammar's `format`, given as is or as vLLM's older `structures` + `triggers`: free text
    until a trigger, then one of the structures that begins with it."""
    if fmt.format is not None:
        return fmt.format
    if fmt.structures is None or fmt.triggers is None:
        raise bad_request("response_format of type 'structural_tag' needs a 'format' object "
                          "(or 'structures' and 'triggers')", param="response_format.format")
    tags = [{"type": "tag", "begin": s.begin, "end": s.end,
             "content": {"type": "json_schema", "json_schema": s.schema_ if s.schema_ is not None else {}}}
            for s in fmt.structures]
    return {"type": "triggered_tags", "triggers": fmt.triggers, "tags": tags}


def _structured_outputs(so: StructuredOutputs) -> list[tuple[str, GrammarSpec]]:
    specs = {
        "structured_outputs.json": _schema(so.json_, "structured_outputs.json"),
        "structured_outputs.regex": _regex(so.regex),
        "structured_outputs.choice": _choice(so.choice, "structured_outputs.choice"),
        "structured_outputs.grammar": _ebnf(so.grammar),
        "structured_outputs.json_object": GrammarSpec("json_object") if so.json_object else None,
        "structured_outputs.structural_tag": (GrammarSpec("structural_tag", so.structural_tag)
                                              if so.structural_tag is not None else None),
    }
    return [(param, spec) for param, spec in specs.items() if spec is not None]


def _schema(schema: dict[str, Any] | str | None, param: str, strict: bool = False) -> GrammarSpec | None:
    """A JSON schema given as an object or as JSON text."""
    if schema is None:
        return None
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except (json.JSONDecodeError, RecursionError) as exc:  # RecursionError: nested past the parser's limit
            raise bad_request(f"{param} is not valid JSON: {exc}", param=param) from None
    if not isinstance(schema, dict):
        raise bad_request(f"{param} must be a JSON object (a JSON schema)", param=param)
    return GrammarSpec("json_schema", json.dumps(schema), strict=strict)


def _regex(pattern: str | None) -> GrammarSpec | None:
    return None if pattern is None else GrammarSpec("regex", pattern)


def _ebnf(grammar: str | None) -> GrammarSpec | None:
    return None if grammar is None else GrammarSpec("ebnf", grammar)


def _choice(choices: list[str] | None, param: str) -> GrammarSpec | None:
    if choices is None:
        return None
    if not choices or any(c == "" for c in choices):
        raise bad_request(f"{param} must be a non-empty list of non-empty strings", param=param)
    from lmserve.sampling.grammar import choice_spec  # as GrammarError above

    return choice_spec(choices)
