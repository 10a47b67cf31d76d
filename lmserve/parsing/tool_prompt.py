"""Tools for chat templates that do not render them (plain ChatML, e.g. SmolLM2): the Hermes /
Qwen2.5 system prompt, and tool calls and results rewritten as the ordinary turns Qwen2.5's
template would have produced."""

from __future__ import annotations

import functools
import json
from itertools import groupby
from typing import Any

import jinja2

# Qwen2.5's chat template wording, so Hermes-trained models see the text they were trained on.
_TOOLS_HEADER = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
)
_TOOLS_FOOTER = (
    "\n</tools>\n\nFor each function call, return a json object with function name and arguments "
    "within <tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>'
)


def tools_system_prompt(tools: list[dict[str, Any]]) -> str:
    """The Hermes-style tools section: one JSON line per tool (as the request gave it, e.g.
    {"type": "function", "function": {...}}), then how to write a call."""
    lines = "".join("\n" + json.dumps(tool, ensure_ascii=False) for tool in tools)
    return _TOOLS_HEADER + lines + _TOOLS_FOOTER


@functools.lru_cache(maxsize=16)  # asked per chat request; lexing a template costs ~0.1-1 ms
def template_renders_tools(chat_template: str) -> bool:
    """Whether the template's code reads the `tools` variable (text outside jinja tags, such as
    an example prompt mentioning tools, does not count)."""
    try:
        tokens = jinja2.Environment().lex(chat_template)
        return any(kind == "name" and value == "tools" for _, kind, value in tokens)
    except jinja2.TemplateSyntaxError:
        return False


def add_tools_system_prompt(messages: list[dict[str, Any]], tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`messages` with the tools section appended to the leading system message (after a blank
    line, as Qwen2.5 does), or as a new leading system message if there is none."""
    section = tools_system_prompt(tools)
    if messages and messages[0].get("role") == "system":
        first = dict(messages[0])
        first["content"] = _text_of(first.get("content")) + "\n\n" + section
        return [first, *messages[1:]]
    return [{"role": "system", "content": section}, *messages]


def messages_for_template(messages: list[dict[str, Any]], renders_tools: bool) -> list[dict[str, Any]]:
    """Messages ready for a chat template (new dicts; the input is not modified).

    renders_tools: the template knows tool_calls and role "tool" itself; only the calls'
    arguments are decoded from JSON strings to objects, as HF templates expect (`| tojson`).
    Otherwise (plain ChatML): an assistant message's calls become `<tool_call>` blocks after its
    content, and each run of consecutive tool results becomes one user message of
    `<tool_response>` blocks, the turns Qwen2.5's template writes.
    """
    if renders_tools:
        return [_with_decoded_arguments(message) for message in messages]
    result: list[dict[str, Any]] = []
    for is_tool, run in groupby(messages, key=lambda message: message.get("role") in ("tool", "function")):
        if is_tool:
            result.append(_tool_responses(list(run)))
        else:
            result.extend(_assistant_with_call_blocks(m) if m.get("tool_calls") else dict(m) for m in run)
    return result


def _with_decoded_arguments(message: dict[str, Any]) -> dict[str, Any]:
    copy = dict(message)
    if message.get("tool_calls"):
        copy["tool_calls"] = [_decoded_call(call) for call in message["tool_calls"]]
    return copy


def _decoded_call(call: dict[str, Any]) -> dict[str, Any]:
    function = dict(call.get("function") or {})
    function["arguments"] = _decoded_arguments(function.get("arguments"))
    return {**call, "function": function}


def _decoded_arguments(arguments: Any) -> Any:
    """OpenAI sends arguments as a JSON string; templates want the object."""
    if not isinstance(arguments, str):
        return {} if arguments is None else arguments
    try:
        return json.loads(arguments)
    except (ValueError, RecursionError):  # RecursionError: JSON nested past the parser's limit
        return arguments  # not JSON: keep the model's text rather than guess


def _assistant_with_call_blocks(message: dict[str, Any]) -> dict[str, Any]:
    parts = [_text_of(message.get("content"))] if message.get("content") else []
    for call in message["tool_calls"]:
        function = call.get("function") or {}
        body = {"name": function.get("name", ""), "arguments": _decoded_arguments(function.get("arguments"))}
        parts.append("<tool_call>\n" + json.dumps(body, ensure_ascii=False) + "\n</tool_call>")
    copy = {key: value for key, value in message.items() if key != "tool_calls"}
    copy["content"] = "\n".join(parts)
    return copy


def _tool_responses(run: list[dict[str, Any]]) -> dict[str, Any]:
    blocks = ["<tool_response>\n" + _text_of(m.get("content")) + "\n</tool_response>" for m in run]
    return {"role": "user", "content": "\n".join(blocks)}


def _text_of(content: Any) -> str:
    """Message content as text: a string, or the text parts of a content-part list."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content if isinstance(part, dict))
