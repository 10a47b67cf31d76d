"""Model output -> OpenAI message parts: reasoning (`<think>`) and tool calls, streamed or whole.

Everything here is pure Python over text (no tokenizer, no torch), one parser instance per
sequence. Special tokens the formats rely on (`[TOOL_CALLS]`, `<|python_tag|>`) must reach the
parser, so detokenize with skip_special_tokens=False when a format needs them.

Chaining, per sequence: detokenizer text deltas -> ReasoningParser.feed (if the model reasons)
-> its `content` -> ToolParser.feed (if the request has tools); finish() both at the end, in
that order, feeding the reasoning parser's final content to the tool parser before its finish().
ReplyParser (reply.py) is that chain, set up from one request's ReplyFormat.
"""

from lmserve.parsing.events import (
    ContentDelta,
    Event,
    ParsedToolOutput,
    ToolCall,
    ToolCallDelta,
    collect_events,
    make_tool_call_id,
)
from lmserve.parsing.reasoning import (
    ReasoningDelta,
    ReasoningParser,
    template_opens_reasoning,
)
from lmserve.parsing.reply import (
    Reply,
    ReplyDelta,
    ReplyFormat,
    ReplyParser,
    parse_reply,
)
from lmserve.parsing.syntax import (
    HERMES_SYNTAX,
    LLAMA3_SYNTAX,
    MISTRAL_SYNTAX,
    MISTRAL_V11_SYNTAX,
    ToolCallSyntax,
)
from lmserve.parsing.tool_formats import (
    HermesToolParser,
    Llama3JsonToolParser,
    MistralToolParser,
    tool_call_syntax_for,
    tool_parser_for,
)
from lmserve.parsing.tool_parsers import ToolParser
from lmserve.parsing.tool_prompt import (
    add_tools_system_prompt,
    messages_for_template,
    template_renders_tools,
    tools_system_prompt,
)

__all__ = [
    "HERMES_SYNTAX",
    "LLAMA3_SYNTAX",
    "MISTRAL_SYNTAX",
    "MISTRAL_V11_SYNTAX",
    "ContentDelta",
    "Event",
    "HermesToolParser",
    "Llama3JsonToolParser",
    "MistralToolParser",
    "ParsedToolOutput",
    "ReasoningDelta",
    "ReasoningParser",
    "Reply",
    "ReplyDelta",
    "ReplyFormat",
    "ReplyParser",
    "ToolCall",
    "ToolCallDelta",
    "ToolCallSyntax",
    "ToolParser",
    "add_tools_system_prompt",
    "collect_events",
    "make_tool_call_id",
    "messages_for_template",
    "parse_reply",
    "template_opens_reasoning",
    "template_renders_tools",
    "tool_call_syntax_for",
    "tool_parser_for",
    "tools_system_prompt",
]
