"""The request schema of OpenAI's Responses API (POST /v1/responses).

Every field declared here is honoured, or refused by name when set (requests/responses_input.py
says which); undeclared names are tolerated, as OpenAI's server tolerates them.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from lmserve.server.protocol.requests import Int


class ResponsesRequest(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True, allow_inf_nan=False)

    model: str | None = None
    input: str | list[dict[str, Any]] = Field(min_length=1)
    instructions: str | None = None
    previous_response_id: str | None = None
    store: bool = True
    stream: bool = False
    max_output_tokens: Int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    text: dict[str, Any] | None = None  # {"format": {"type": "text" | "json_object" | "json_schema", ...}}
    reasoning: dict[str, Any] | None = None
    truncation: Literal["disabled", "auto"] | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None
    keep_alive: str | int | float | None = None  # how long the model stays loaded after (Ollama's)
    # declared so a value is refused by name rather than ignored
    conversation: str | dict[str, Any] | None = None
    background: bool | None = None
    include: list[str] | None = None  # "message.output_text.logprobs" only
    top_logprobs: Int | None = Field(None, ge=0, le=20)
    max_tool_calls: Int | None = None
    prompt: dict[str, Any] | None = None
