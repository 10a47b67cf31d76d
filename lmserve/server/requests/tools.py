"""Tool calling, request side: which tools, which tool_choice, and the grammar that enforces it.

The model writes calls in its own format (Hermes/Qwen `<tool_call>`, Llama 3 JSON, Mistral
`[TOOL_CALLS]`), chosen from its chat template. Every mode is enforced by a structural-tag
grammar: "required" and a named function allow nothing but calls to the offered tools; "auto"
lets the model write text, but once it starts a call, the call must name an offered tool and
its arguments must match that tool's parameters schema.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lmserve.parsing import (
    ToolCallSyntax,
    ToolParser,
    tool_call_syntax_for,
    tool_parser_for,
)
from lmserve.request import GrammarSpec
from lmserve.server.errors import bad_request, unsupported
from lmserve.server.protocol import ChatCompletionRequest, ToolDefinition

if TYPE_CHECKING:
    from lmserve.text.tokenizer import ChatTokenizer

# Whitespace runs inside arguments: a sampled small model can otherwise pad without end.
MAX_ARGUMENT_WHITESPACE = 2


@dataclass(frozen=True)
class ToolsPlan:
    """The tools a chat request offers and how the model must use them."""

    tools: tuple[dict[str, Any], ...]  # OpenAI tool objects, as the chat template receives them
    mode: str  # "auto" | "required" | "named"
    forced_name: str | None  # mode "named": the function the model must call
    parallel: bool  # several calls allowed in one reply
    syntax: ToolCallSyntax
    parser: type[ToolParser]

    @property
    def names(self) -> frozenset[str]:
        """The offered functions' names: a reply's untagged JSON call must name one."""
        return frozenset(tool["function"]["name"] for tool in self.tools)

    @property
    def needs_special_tokens(self) -> bool:
        """The format's markers ([TOOL_CALLS], <|python_tag|>) are special tokens the parser must see."""
        return self.syntax.format != "hermes"

    def grammar(self) -> GrammarSpec:
        return GrammarSpec("structural_tag", json.dumps({"type": "structural_tag", "format": self._format()}))

    def _format(self) -> dict[str, Any]:
        tools = [t for t in self.tools if self.mode != "named" or t["function"]["name"] == self.forced_name]
        if self.mode == "auto":  # free text, then calls once the trigger appears
            s = self.syntax
            tags = [_call_tag(s, tool, s.calls_prefix, s.calls_suffix) for tool in tools]
            return {"type": "triggered_tags", "triggers": [s.trigger], "tags": tags,
                    "stop_after_first": not self.parallel}
        tags = [_call_tag(self.syntax, tool) for tool in tools]
        if self.mode == "required" and self.parallel:
            calls = {"type": "tags_with_separator", "tags": tags, "separator": self.syntax.call_separator,
                     "at_least_one": True}
        else:
            calls = tags[0] if len(tags) == 1 else {"type": "or", "elements": tags}
        return _wrapped(calls, self.syntax.calls_prefix, self.syntax.calls_suffix)


def _call_tag(syntax: ToolCallSyntax, tool: dict[str, Any], before: str = "", after: str = "") -> dict[str, Any]:
    function = tool["function"]
    name = json.dumps(function["name"]) if syntax.name_quoted else function["name"]
    schema = function.get("parameters") or {"type": "object"}
    return {
        "type": "tag",
        "begin": before + syntax.call_prefix + name + syntax.arguments_infix,
        "content": {"type": "json_schema", "json_schema": schema, "max_whitespace_cnt": MAX_ARGUMENT_WHITESPACE},
        "end": syntax.call_suffix + after,
    }


def _wrapped(inner: dict[str, Any], prefix: str, suffix: str) -> dict[str, Any]:
    parts = ([{"type": "const_string", "value": prefix}] if prefix else []) + [inner]
    parts += [{"type": "const_string", "value": suffix}] if suffix else []
    return inner if len(parts) == 1 else {"type": "sequence", "elements": parts}


def plan_tools(request: ChatCompletionRequest, tokenizer: ChatTokenizer) -> ToolsPlan | None:
    """The request's tool use, validated; None when the model is not to call tools."""
    choice = request.tool_choice if request.tool_choice is not None else "auto"
    if not request.tools:
        if choice not in ("none", "auto"):
            raise bad_request("tool_choice needs 'tools' to choose from", param="tool_choice")
        return None
    tools = tuple(_tool_dict(tool, i) for i, tool in enumerate(request.tools))
    _check_unique_names(tools)
    mode, forced = _mode(choice, [t["function"]["name"] for t in tools])
    if mode == "none":
        return None
    template = tokenizer.chat_template
    return ToolsPlan(tools, mode, forced, request.parallel_tool_calls is not False,
                     tool_call_syntax_for(template), tool_parser_for(template))


def _tool_dict(tool: ToolDefinition, i: int) -> dict[str, Any]:
    if tool.type != "function":
        raise unsupported(f"tools[{i}].type", f"tool type {tool.type!r} (only 'function')")
    if tool.function is None:
        raise bad_request("a function tool needs a 'function' object", param=f"tools[{i}].function")
    parameters = tool.function.parameters
    if parameters is not None and parameters.get("type", "object") != "object":
        raise bad_request("function parameters must be a JSON schema of type 'object'",
                          param=f"tools[{i}].function.parameters")
    return tool.model_dump(exclude_none=True)


def _check_unique_names(tools: tuple[dict[str, Any], ...]) -> None:
    seen: set[str] = set()
    for i, tool in enumerate(tools):
        name = tool["function"]["name"]
        if name in seen:
            raise bad_request(f"two tools are named {name!r}", param=f"tools[{i}].function.name")
        seen.add(name)


def _mode(choice: str | dict[str, Any], names: list[str]) -> tuple[str, str | None]:
    if isinstance(choice, str):
        if choice not in ("none", "auto", "required"):
            raise bad_request(f"tool_choice {choice!r} is not 'none', 'auto', 'required' or a named function",
                              param="tool_choice")
        return choice, None
    function = choice.get("function")
    name = function.get("name") if isinstance(function, dict) else None
    if choice.get("type") != "function" or not isinstance(name, str):
        raise bad_request('a named tool_choice is {"type": "function", "function": {"name": ...}}',
                          param="tool_choice")
    if name not in names:
        raise bad_request(f"tool_choice names {name!r}, which is not among the tools ({', '.join(names)})",
                          param="tool_choice")
    return "named", name
