"""A Responses API request -> the chat request lmserve runs, and the input items it stores.

Input items become chat messages: a message item (string content or input_text / output_text
parts) keeps its role (developer counts as system), function_call items become an assistant
message's tool calls, function_call_output items tool messages, and reasoning items are left out
of the prompt, as chat templates leave out earlier reasoning. `instructions` is a system message
first, for this response only (a continuation does not carry it over). Function tools, tool_choice
and text.format map onto the chat request's tools, tool_choice and response_format, so they are
enforced the same way.
"""

from __future__ import annotations

import uuid
from typing import Any

from lmserve.server.errors import APIError, bad_request
from lmserve.server.protocol import ChatCompletionRequest
from lmserve.server.requests.plan import GenerationPlan, chat_plan
from lmserve.server.protocol.responses_api import ResponsesRequest

ROLES = {"user": "user", "system": "system", "developer": "system", "assistant": "assistant"}
TEXT_PARTS = ("input_text", "output_text", "text")
NEEDS = {"function_call": ("call_id", "name", "arguments"), "function_call_output": ("call_id", "output"),
         "reasoning": ()}  # the other item types served, and their required string fields
REFUSED = {  # set to anything but null/false/empty, these are refused by name
    "background": "background responses are not supported",
    "max_tool_calls": "max_tool_calls is not supported",
    "prompt": "stored prompt templates are not supported",
}
LOGPROBS = "message.output_text.logprobs"  # the one `include` served


def _refused(message: str, param: str) -> APIError:
    return bad_request(message, param=param, code="unsupported_parameter")


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def refuse_unsupported(body: ResponsesRequest) -> None:
    for name, why in REFUSED.items():
        if getattr(body, name):
            raise _refused(f"'{name}': {why}", param=name)
    for position, name in enumerate(body.include or ()):
        if name != LOGPROBS:
            raise _refused(f"include[{position}]: {name!r} is not served (only {LOGPROBS!r})",
                           param=f"include[{position}]")
    if body.reasoning and body.reasoning.get("effort") is not None:
        raise _refused("'reasoning.effort': the models served here have no reasoning effort setting",
                       param="reasoning.effort")


def conversation_id(body: ResponsesRequest) -> str | None:
    """The conversation the response continues and adds to (`conversation`: an id or {"id": ...})."""
    given = body.conversation
    if given is None:
        return None
    if body.previous_response_id is not None:
        raise bad_request("conversation and previous_response_id cannot be used together", param="conversation")
    if isinstance(given, dict):
        given = given.get("id")
    if not isinstance(given, str) or not given:
        raise bad_request("conversation must be a conversation id or {\"id\": ...}", param="conversation")
    return given


def wants_logprobs(body: ResponsesRequest) -> bool:
    """Logprobs on the output text: asked for by `include`, or by a `top_logprobs` above 0 alone."""
    return LOGPROBS in (body.include or ()) or bool(body.top_logprobs)


def logprobs_plan(plan: GenerationPlan) -> GenerationPlan:
    """A plan whose tokens are all message text, as the output_text logprobs need: a reply parsed
    into reasoning or tool calls would mix them in, so it is refused by name."""
    if plan.reply is not None:
        raise _refused("logprobs on /v1/responses are served for plain text replies; with tools or a reasoning "
                       "model use /v1/chat/completions", param="include")
    return plan


def truncating_plan(request: ChatCompletionRequest, *args: Any, **fields: Any) -> GenerationPlan:
    """chat_plan for `truncation: "auto"`: while the prompt (with the reply's room) does not fit the
    context, the oldest message after the leading system ones is dropped (a tool result whose call
    went with it too); the newest message always stays, and if it alone does not fit, that is
    the context error."""
    while True:
        try:
            return chat_plan(request, *args, **fields)
        except APIError as error:
            messages = list(request.messages)
            first = next((i for i, m in enumerate(messages) if m.role not in ("system", "developer")), len(messages))
            if error.code != "context_length_exceeded" or first >= len(messages) - 1:
                raise
            del messages[first]
            while first < len(messages) - 1 and messages[first].role == "tool":
                del messages[first]
            request = request.model_copy(update={"messages": messages})


def input_items(given: str | list[dict[str, Any]], field: str = "input") -> list[dict[str, Any]]:
    """Input (a string, or a list of items) as stored items, each with an id; `field` names it in errors."""
    if isinstance(given, str):
        return [message_item("user", given)]
    items = []
    for position, item in enumerate(given):
        if not isinstance(item, dict):
            raise bad_request(f"{field}[{position}] must be an item object", param=f"{field}[{position}]")
        kind = item.get("type", "message")
        if kind == "message" or ("role" in item and "type" not in item):
            role = item.get("role")
            if role not in ROLES:
                raise bad_request(f"{field}[{position}].role must be one of {sorted(ROLES)}", param=f"{field}[{position}].role")
            items.append(message_item(role, _text(item.get("content"), f"{field}[{position}]"), item.get("id")))
        elif kind in NEEDS:
            missing = [name for name in NEEDS[kind] if not isinstance(item.get(name), str)]
            if missing:
                raise bad_request(f"{field}[{position}] ({kind}) needs a string '{missing[0]}'",
                                  param=f"{field}[{position}].{missing[0]}")
            items.append({**item, "id": item.get("id") or new_id({"reasoning": "rs"}.get(kind, "fc"))})
        else:
            raise _refused(f"{field}[{position}]: items of type {kind!r} are not supported", param=f"{field}[{position}].type")
    return items


def message_item(role: str, text: str, item_id: str | None = None) -> dict[str, Any]:
    part = "output_text" if role == "assistant" else "input_text"
    return {"type": "message", "id": item_id or new_id("msg"), "role": role, "status": "completed",
            "content": [{"type": part, "text": text}]}


def _text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise bad_request(f"{where}.content must be a string or a list of parts", param=f"{where}.content")
    texts = []
    for part in content:
        if not isinstance(part, dict) or part.get("type") not in TEXT_PARTS or not isinstance(part.get("text"), str):
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise _refused(f"{where}.content: parts of type {kind!r} are not supported (text only)",
                           param=f"{where}.content")
        texts.append(part["text"])
    return "".join(texts)


def chat_messages(items: list[dict[str, Any]], instructions: str | None, field: str = "input") -> list[dict[str, Any]]:
    """The chat messages of a context of stored items; a 400 naming `field` (where the items came
    from) if none is left: reasoning items alone are no prompt."""
    messages: list[dict[str, Any]] = [{"role": "system", "content": instructions}] if instructions else []
    for item in items:
        kind = item.get("type", "message")
        if kind == "message":
            text = "".join(part.get("text", "") for part in item["content"])
            messages.append({"role": ROLES[item["role"]], "content": text})
        elif kind == "function_call":
            call = {"id": item["call_id"], "type": "function",
                    "function": {"name": item["name"], "arguments": item.get("arguments", "{}")}}
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant" and last.get("tool_calls") is not None:
                last["tool_calls"].append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output")
            messages.append({"role": "tool", "tool_call_id": item["call_id"],
                             "content": output if isinstance(output, str) else str(output)})
    if not messages:
        raise bad_request(f"'{field}' holds no message to answer (reasoning items are left out of the prompt)",
                          param=field)
    return messages


def chat_request(body: ResponsesRequest, messages: list[dict[str, Any]]) -> ChatCompletionRequest:
    """The chat request that runs `body` over `messages`."""
    fields: dict[str, Any] = {"model": body.model, "messages": messages, "stream": body.stream}
    if body.max_output_tokens is not None:
        fields["max_completion_tokens"] = body.max_output_tokens
    for name in ("temperature", "top_p", "parallel_tool_calls", "keep_alive"):
        if getattr(body, name) is not None:
            fields[name] = getattr(body, name)
    if body.tools:
        fields["tools"] = [_chat_tool(tool, i) for i, tool in enumerate(body.tools)]
    if body.tool_choice is not None:
        fields["tool_choice"] = _chat_tool_choice(body.tool_choice)
    if wants_logprobs(body):
        fields |= {"logprobs": True, "top_logprobs": body.top_logprobs or 0}
    response_format = _response_format((body.text or {}).get("format"))
    if response_format is not None:
        fields["response_format"] = response_format
    return ChatCompletionRequest.model_validate(fields, strict=False)


def _chat_tool(tool: dict[str, Any], position: int) -> dict[str, Any]:
    if tool.get("type") != "function":
        raise _refused(f"tools[{position}]: only function tools are served (not {tool.get('type')!r})",
                       param=f"tools[{position}].type")
    function = {k: tool[k] for k in ("name", "description", "parameters", "strict") if tool.get(k) is not None}
    return {"type": "function", "function": function}


def _chat_tool_choice(choice: str | dict[str, Any]) -> str | dict[str, Any]:
    if isinstance(choice, str):
        return choice
    if choice.get("type") == "function" and "name" in choice:
        return {"type": "function", "function": {"name": choice["name"]}}
    raise _refused(f"tool_choice {choice!r} is not supported", param="tool_choice")


def _response_format(fmt: dict[str, Any] | None) -> dict[str, Any] | None:
    if fmt is None or fmt.get("type") == "text":
        return None
    if fmt.get("type") == "json_object":
        return {"type": "json_object"}
    if fmt.get("type") == "json_schema":
        schema = {k: fmt[k] for k in ("name", "schema", "strict", "description") if k in fmt}
        return {"type": "json_schema", "json_schema": schema}
    raise bad_request(f"text.format.type {fmt.get('type')!r} is not one of text, json_object, json_schema",
                      param="text.format.type")
