"""Chat messages (and tools) -> the prompt text the model's chat template makes of them.

Templates that render tools themselves (Qwen2.5, Llama 3.1, Mistral) get them as the `tools`
variable. Templates that know no tools (plain ChatML, as the default SmolLM2 has) get a
Hermes-style tools section in the system message, and tool calls and tool results in earlier
turns rewritten as `<tool_call>` / `<tool_response>` text, so `role: "tool"` round-trips.

Special-token text in the request's own strings (messages, tools, template variables) stays
plain text unless the request sets parse_special (lmserve/text/special_text.py): it is masked
before lmserve adds its own markup and the template renders, so only those stay special.
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
from lmserve.server.protocol import ChatCompletionRequest, ChatMessage, ContentPart
from lmserve.server.requests.tools import ToolsPlan
from lmserve.text.chat_template import CHATML_TEMPLATE, read_variables
from lmserve.text.special_text import PromptText, SpecialTextMask

if TYPE_CHECKING:
    from lmserve.text.tokenizer import ChatTokenizer

THINK_OPEN = "<think>"


def render_chat(request: ChatCompletionRequest, tokenizer: ChatTokenizer, tools: ToolsPlan | None) -> PromptText:
    """The prompt text, ending with the assistant's turn opened (or, with continue_final_message,
    inside the last assistant message), and where in it the request spelled special tokens.
    Template errors are 400s."""
    mask = SpecialTextMask(() if request.parse_special else tokenizer.special_text_set)
    messages = chat_messages(request.messages)
    rendered = mask.hide([_template_message(message, i) for i, message in enumerate(messages)])
    offered_tools = mask.hide(list(tools.tools)) if tools is not None else None
    renders_tools = template_renders_tools(tokenizer.chat_template or "")
    if tools is not None or any(m["role"] == "tool" or m.get("tool_calls") for m in rendered):
        rendered = messages_for_template(rendered, renders_tools)
    if offered_tools is not None and not renders_tools:
        rendered = add_tools_system_prompt(rendered, offered_tools)
    variables = mask.hide(template_variables(request, tokenizer))
    try:
        text = tokenizer.apply_chat_template(rendered, add_generation_prompt=request.add_generation_prompt,
                                             tools=offered_tools if renders_tools else None, **variables)
    except ValueError as exc:  # ChatTemplateError: the template rejected these messages
        raise bad_request(mask.reveal(str(exc)).text, param="messages") from exc
    return mask.reveal(_continued(text, rendered[-1]) if request.continue_final_message else text)


def chat_messages(messages: list[ChatMessage] | str) -> list[ChatMessage]:
    """The conversation; a plain string is one user message (as mistral.rs takes it)."""
    return [ChatMessage(role="user", content=messages)] if isinstance(messages, str) else messages


# Variables the route sets itself: chat_template_kwargs may not override them.
_ROUTE_VARIABLES = frozenset({"messages", "tools", "add_generation_prompt", "bos_token", "eos_token"})


def template_variables(request: ChatCompletionRequest, tokenizer: ChatTokenizer) -> dict[str, Any]:
    """chat_template_kwargs (and the top-level enable_thinking of lmdeploy and mistral.rs), each
    refused by name unless the model's template reads it: a variable it never reads would be
    accepted and ignored."""
    variables = dict(request.chat_template_kwargs or {})
    if request.enable_thinking is not None:
        variables.setdefault("enable_thinking", request.enable_thinking)
    reserved = sorted(_ROUTE_VARIABLES & variables.keys())
    if reserved:
        raise bad_request(f"chat_template_kwargs may not set {reserved}; use the request's own fields",
                          param="chat_template_kwargs")
    read = read_variables(tokenizer.chat_template or CHATML_TEMPLATE)
    unread = sorted(variables.keys() - read)
    if unread:
        raise bad_request(f"the model's chat template does not use {unread}, so they would change nothing",
                          param="chat_template_kwargs", code="unsupported_parameter")
    return variables


def _continued(text: str, final: dict[str, Any]) -> str:
    """The prompt cut right after the final assistant message's content (vLLM's
    continue_final_message), so the reply continues it."""
    if final["role"] != "assistant":
        raise bad_request("continue_final_message needs the last message to be the assistant's",
                          param="continue_final_message")
    content = final["content"]
    position = text.rfind(content) if content else -1
    if position < 0:
        raise bad_request("the chat template did not render the final message's content as it is, "
                          "so it cannot be continued", param="continue_final_message")
    return text[: position + len(content)]


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
