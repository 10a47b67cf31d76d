"""The literal text of tool calls per format, for building grammars (and for tests).

A reply holding calls c1..cn is

    calls_prefix + call(c1) + call_separator + ... + call(cn) + calls_suffix
    call(c) = call_prefix + NAME + arguments_infix + ARGS + call_suffix

where NAME is the function name (a JSON string if name_quoted, else the bare name) and ARGS the
arguments JSON object. In tool_choice "auto" the model may write content first; a grammar waits
for the format's trigger before it constrains a call. The trigger is where the format's parser
opens a call (`<tool_call>`, `[TOOL_CALLS]`), so that no call the parser reports escaped the
grammar: a trigger longer than that (`<tool_call>\n{"name": `) let a model write
`<tool_call>{"name": "made_up"...` unconstrained, and the parser still read it as a call.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class ToolCallSyntax:
    """How one format writes tool calls; see the module docstring for the layout."""

    format: str
    calls_prefix: str
    call_prefix: str
    name_quoted: bool
    arguments_infix: str
    call_suffix: str
    call_separator: str
    calls_suffix: str
    opens_at: str = ""  # where the parser opens a call, if shorter than calls_prefix + call_prefix

    @property
    def trigger(self) -> str:
        """The text after which a tool_choice "auto" grammar constrains the rest as a call."""
        return self.opens_at or self.calls_prefix + self.call_prefix

    def render_call(self, name: str, arguments_json: str) -> str:
        """The text of one call, as the format's parser expects it."""
        written_name = json.dumps(name, ensure_ascii=False) if self.name_quoted else name
        return self.call_prefix + written_name + self.arguments_infix + arguments_json + self.call_suffix

    def render(self, calls: Sequence[tuple[str, str]]) -> str:
        """The text of a reply made only of `calls`, given as (name, arguments_json) pairs."""
        body = self.call_separator.join(self.render_call(name, args) for name, args in calls)
        return self.calls_prefix + body + self.calls_suffix


HERMES_SYNTAX = ToolCallSyntax(
    format="hermes",
    calls_prefix="",
    call_prefix='<tool_call>\n{"name": ',
    name_quoted=True,
    arguments_infix=', "arguments": ',
    call_suffix="}\n</tool_call>",
    call_separator="\n",
    calls_suffix="",
    opens_at="<tool_call>",
)

# Llama 3.1/3.2/3.3 JSON tool calling (tools in the prompt), as its chat template asks for it.
LLAMA3_SYNTAX = ToolCallSyntax(
    format="llama3_json",
    calls_prefix="",
    call_prefix='{"name": ',
    name_quoted=True,
    arguments_infix=', "parameters": ',
    call_suffix="}",
    call_separator="; ",
    calls_suffix="",
)

# Mistral v3 tokenizers (Mistral-7B-Instruct-v0.3, Mixtral 8x22B).
MISTRAL_SYNTAX = ToolCallSyntax(
    format="mistral",
    calls_prefix="[TOOL_CALLS][",
    call_prefix='{"name": ',
    name_quoted=True,
    arguments_infix=', "arguments": ',
    call_suffix="}",
    call_separator=", ",
    calls_suffix="]",
    opens_at="[TOOL_CALLS]",
)

# Mistral v11+ tokenizers (Mistral Small 3.1+, Devstral, Magistral).
MISTRAL_V11_SYNTAX = ToolCallSyntax(
    format="mistral_v11",
    calls_prefix="",
    call_prefix="[TOOL_CALLS]",
    name_quoted=False,
    arguments_infix="[ARGS]",
    call_suffix="",
    call_separator="",
    calls_suffix="",
)
