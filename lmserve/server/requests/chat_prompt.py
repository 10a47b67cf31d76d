"""Chat messages (and tools) -> the prompt text the model's chat template makes of them.

Templates that render tools themselves (Qwen2.5, Llama 3.1, Mistral) get them as the `tools`
variable. Templates that know no tools (plain ChatML, as the default SmolLM2 has) get a
Hermes-style tools section in the system message, and tool calls and tool results in earlier
turns rewritten as `<tool_call>` / `<tool_response>` text, so `role: "tool"` round-trips.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lmserve.parsing import (
    ReplyFormat,
    add_tools_system_prompt,
    messages_for_template,
    template_opens_reasoning,
    template_renders_tools,
)
from lmserve.server.errors import bad_request, unsupported
from lmserve.server.protocol import ChatMessage, ContentPart
from lmserve.server.requests.tools import ToolsPlan

if TYPE_CHECKING:
    from lmserve.text.tokenizer import ChatTokenizer

THINK_OPEN = "<think>"


def render_chat(messages: list[ChatMessage], tokenizer: ChatTokenizer, tools: ToolsPlan | None) -> str:
    """The prompt text, ending with the assistant's turn opened. Template errors are 400s."""
    rendered = [_template_message(message, i) for i, message in enumerate(messages)]
    renders_tools = template_renders_tools(tokenizer.chat_template or "")
    if tools is not None or any(m["role"] == "tool" or m.get("tool_calls") for m in rendered):
        rendered = messages_for_template(rendered, renders_tools)
    if tools is not None and not renders_tools:
        rendered = add_tools_system_prompt(rendered, list(tools.tools))
    offered = list(tools.tools) if tools is not None and renders_tools else None
    try:
        return tokenizer.apply_chat_template(rendered, add_generation_prompt=True, tools=offered)
    except ValueError as exc:  # ChatTemplateError: the template rejected these messages
        raise bad_request(str(exc), param="messages") from exc


def reply_format(tokenizer: ChatTokenizer, prompt_text: str, tools: ToolsPlan | None,
                 forced: bool = False) -> ReplyFormat | None:
    """How to read replies: tool calls when tools are offered, reasoning when the model thinks
    and no grammar forces the reply from its first token (`forced`)."""
    reasoning = THINK_OPEN in (tokenizer.chat_template or "") and not forced
    if tools is None and not reasoning:
        return None
    return ReplyFormat(
        tool_parser=tools.parser if tools is not None else None,
        reasoning=reasoning,
        starts_in_reasoning=reasoning and template_opens_reasoning(prompt_text),
        tool_names=tools.names if tools is not None else None,
    )


def _template_message(message: ChatMessage, i: int) -> dict[str, Any]:
    """The message as the chat template sees it: plain-text content, extra fields kept."""
    rendered = message.model_dump(exclude_none=True)
    rendered.pop("reasoning_content", None)  # earlier thinking is not shown to the model again
    # "developer" is OpenAI's newer name for the system role; templates know "system".
    rendered["role"] = "system" if message.role == "developer" else message.role
    rendered["content"] = _text_content(message.content, i)
    return rendered


def _text_content(content: str | list[ContentPart] | None, i: int) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    for j, part in enumerate(content):
        _check_text_part(part, f"messages[{i}].content[{j}]")
    return "\n".join(part.text for part in content)


def _check_text_part(part: ContentPart, param: str) -> None:
    if part.type != "text":
        raise unsupported(param, f"content part type '{part.type}' (only 'text')")
    if part.text is None:
        raise bad_request("a text content part needs 'text'", param=f"{param}.text")
