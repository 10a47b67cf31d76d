"""Pydantic schemas of the responses we send. They mirror the official `openai` client types
field for field."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, model_serializer

FinishReasonName = Literal["stop", "length", "tool_calls"]


# ---------------------------------------------------------------- responses


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class UsageInfo(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None
    # mistral.rs' throughput fields, as the server measures them (queueing counts as prompt time)
    avg_tok_per_sec: float | None = None
    avg_prompt_tok_per_sec: float | None = None
    avg_compl_tok_per_sec: float | None = None
    total_time_sec: float | None = None
    total_prompt_time_sec: float | None = None
    total_completion_time_sec: float | None = None


class _WithTimings(BaseModel):
    """A response that carries llama.cpp's `timings` when the request asked (timings_per_token)."""

    timings: dict[str, float | int] | None = None

    @model_serializer(mode="wrap")
    def _drop_unasked_timings(self, handler: Any) -> dict[str, Any]:
        body = handler(self)
        if body.get("timings", 0) is None:
            del body["timings"]
        return body


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None = None
    refusal: list[ChatTokenLogprob] | None = None


class ResponseFunction(BaseModel):
    name: str
    arguments: str  # JSON text of the arguments object


class ResponseToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: ResponseFunction


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    refusal: str | None = None
    tool_calls: list[ResponseToolCall] | None = None
    reasoning_content: str | None = None  # the model's <think> text (vLLM/DeepSeek's field name)


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReasonName


class ChatCompletionResponse(_WithTimings):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[ChatChoice]
    usage: UsageInfo


class DeltaFunction(BaseModel):
    name: str | None = None
    arguments: str | None = None

    @model_serializer(mode="wrap")
    def _drop_unset(self, handler: Any) -> dict[str, Any]:
        return {key: value for key, value in handler(self).items() if value is not None}


class DeltaToolCall(BaseModel):
    """One streamed tool call piece: the first carries id, type and name; later ones arguments."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunction

    @model_serializer(mode="wrap")
    def _drop_unset(self, handler: Any) -> dict[str, Any]:
        return {key: value for key, value in handler(self).items() if value is not None}


class DeltaMessage(BaseModel):
    """A streamed message delta: only the keys that are set ({} on the finish chunk)."""

    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None

    @model_serializer(mode="wrap")
    def _drop_unset(self, handler: Any) -> dict[str, Any]:
        return {key: value for key, value in handler(self).items() if value is not None}


class ChatChunkChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReasonName | None = None


class ChatCompletionChunk(_WithTimings):
    """One SSE event. `usage` is sent (null until the last chunk) only with include_usage."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[ChatChunkChoice]
    usage: UsageInfo | None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReasonName | None = None  # None only in stream chunks


class CompletionResponse(_WithTimings):
    """A text completion, and also each streamed chunk of one (same object name)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


class ModelStatusInfo(BaseModel):
    """Where a model is in its life, in the shape of llama.cpp's router."""

    value: Literal["unloaded", "downloading", "loading", "loaded", "failed"]
    error: str | None = None  # why it failed to load
    progress: dict[str, int] | None = None  # while downloading: {"done": bytes, "total": bytes (0: unknown)}


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "lmserve"
    max_model_len: int | None = None  # None while the model is not loaded
    kind: Literal["chat", "embedding"] = "chat"  # chat: all routes; embedding: /v1/embeddings only
    aliases: list[str] = []  # other names requests may use for it
    status: ModelStatusInfo


class ModelActionResult(BaseModel):
    success: bool


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str  # str: base64 of little-endian float32 bytes


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


class LlamaEmbedding(BaseModel):
    """One item of llama.cpp's /embeddings answer to its `content` form: a vector per input."""

    index: int
    embedding: list[list[float]]


class HealthStatus(BaseModel):
    """GET /health: "ok" with the loaded chat models' load added up, or "loading" (a 503)."""

    status: Literal["ok", "loading"]
    num_running: int | None = None
    num_waiting: int | None = None
    num_kv_blocks: int | None = None
    num_free_kv_blocks: int | None = None


# ---------------------------------------------------------------- llama.cpp's token routes


class TokenPiece(BaseModel):
    id: int
    piece: str | list[int]  # the token's bytes: text when valid UTF-8, else the byte values


class TokenizeResponse(BaseModel):
    tokens: list[int] | list[TokenPiece]


class DetokenizeResponse(BaseModel):
    content: str
