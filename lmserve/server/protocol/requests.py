"""Pydantic schemas of the requests we accept: OpenAI's, with the peers' extensions.

Requests tolerate unknown fields (extra="allow"); every field declared here is either
honoured or refused with a 400 by the request side (requests/), and known_params.py lists
the peers' names that are not declared here.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field


def _whole(value: Any) -> Any:
    """A JSON number without a fraction is an integer, as JSON Schema (and so the OpenAPI schema
    served) counts it: 2.0 is taken as 2, as llama.cpp's server and vLLM take it. 2.5 stays a
    float, refused where an integer is wanted."""
    return int(value) if type(value) is float and value.is_integer() else value


# Every integer field of a request: 2 or 2.0, never "2" or true.
Int = Annotated[int, BeforeValidator(_whole)]


class _Request(BaseModel):
    # strict: a wrong JSON type is a 400 naming the field (as OpenAI answers), never coerced
    # ("2" for n, "yes" for stream, 1 for logprobs; a whole number as 2.0 is an integer, Int
    # above); NaN and infinities are refused too.
    model_config = ConfigDict(extra="allow", strict=True, allow_inf_nan=False)


# ---------------------------------------------------------------- requests


class ContentPart(_Request):
    """One part of a message's content. Only "text" parts are supported; others are refused."""

    type: str
    text: str | None = None


class ToolCallFunction(_Request):
    name: str
    arguments: str | dict[str, Any] = "{}"  # OpenAI sends a JSON string; some clients an object


class MessageToolCall(_Request):
    """A call an earlier assistant message made, sent back in the conversation."""

    id: str | None = None
    type: str = "function"
    function: ToolCallFunction


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[MessageToolCall] | None = None  # assistant
    tool_call_id: str | None = None  # tool
    reasoning_content: str | None = None  # assistant (dropped from the prompt, as templates do)


class FunctionDefinition(_Request):
    name: str = Field(pattern=r"^[A-Za-z0-9_.\-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None  # JSON schema of the arguments object
    strict: bool | None = None


class ToolDefinition(_Request):
    type: str  # only "function"
    function: FunctionDefinition | None = None


class StreamOptions(_Request):
    include_usage: bool | None = False


class JsonSchemaFormat(_Request):
    """OpenAI's response_format.json_schema."""

    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class TagStructure(_Request):
    """One structure of vLLM's older structural_tag form: begin, a JSON schema, end."""

    begin: str
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    end: str


class ResponseFormat(_Request):
    type: str  # "text" | "json_object" | "json_schema" | "structural_tag"
    json_schema: JsonSchemaFormat | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")  # llama.cpp: json_object + schema
    format: dict[str, Any] | None = None  # structural_tag (xgrammar / vLLM)
    structures: list[TagStructure] | None = None  # structural_tag, vLLM's older form, with triggers
    triggers: list[str] | None = None


class StructuredOutputs(_Request):
    """vLLM's `structured_outputs` object: exactly one constraint."""

    json_: dict[str, Any] | str | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    structural_tag: str | None = None


class SamplingFields(_Request):
    """Fields shared by chat and text completions (OpenAI, then vLLM/llama.cpp extensions)."""

    model: str | None = None  # missing: the served model, as llama.cpp does
    keep_alive: str | float | None = None  # Ollama's: how long the model stays loaded once idle
    temperature: float | None = None
    top_p: float | None = None
    n: Int = Field(1, ge=1, le=128)
    max_tokens: Int | None = Field(None, ge=1)
    stop: str | list[str] | list[Int] | None = None  # strings; token ids as mistral.rs takes them
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    # OpenAI: {"token id": bias}; llama.cpp also [[id or text, bias or false]] and text keys
    logit_bias: dict[str, float | bool] | list[list[Int | str | float | bool]] | None = None
    seed: Int | None = Field(None, ge=-(2**63), le=2**63 - 1)  # 64 bits, as a torch generator; -1: random
    # extensions
    top_k: Int | None = None  # 0 or -1: off
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    stop_token_ids: list[Int] | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    # constrained decoding: OpenAI's response_format, or one of the extensions below
    response_format: ResponseFormat | None = None
    grammar: str | None = None  # GBNF (llama.cpp)
    json_schema: dict[str, Any] | None = None  # llama.cpp
    regex: str | None = None
    choice: list[str] | None = None
    guided_json: dict[str, Any] | str | None = None  # vLLM (older names)
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    structured_outputs: StructuredOutputs | None = None  # vLLM
    # llama.cpp's samplers (and the same ones under mlx-lm's, lmdeploy's and Ollama's names);
    # requests/peer_sampling.py turns them into SamplingParams.
    n_predict: Int | None = Field(None, ge=-1)  # llama.cpp's max_tokens; -1: until the context ends
    repeat_penalty: float | None = Field(None, gt=0)  # over the last repeat_last_n tokens
    repeat_last_n: Int | None = Field(None, ge=-1)  # default 64; 0 disables the penalty, -1: all
    repetition_context_size: Int | None = Field(None, ge=1)  # mlx-lm's repeat_last_n (default 20)
    repeat_penalty_num: Int | None = Field(None, ge=0)  # lllms' repeat_last_n
    penalize_nl: bool | None = None  # false: the newline token is never penalised
    typical_p: float | None = None
    min_keep: Int | None = Field(None, ge=0)
    top_n_sigma: float | None = None  # <= 0: off
    xtc_probability: float | None = None
    xtc_threshold: float | None = None
    dynatemp_range: float | None = None
    dynatemp_exponent: float | None = None
    mirostat: Int | None = None
    mirostat_tau: float | None = None
    mirostat_eta: float | None = None
    dry_multiplier: float | None = None
    dry_base: float | None = None
    dry_allowed_length: Int | None = None
    dry_penalty_last_n: Int | None = Field(None, ge=-1)
    dry_sequence_breakers: list[str] | None = None
    samplers: list[str] | str | None = None  # llama.cpp's order: names, or its one-letter sequence
    min_tokens: Int | None = Field(None, ge=0)  # vLLM
    min_new_tokens: Int | None = Field(None, ge=0)  # lmdeploy's min_tokens
    n_probs: Int | None = Field(None, ge=0, le=20)  # llama.cpp's top logprobs
    post_sampling_probs: bool = False
    id_slot: Int | None = Field(None, ge=-1)  # llama.cpp: the slot to run in; -1: any
    cache_prompt: bool = True  # false: this request neither reads nor fills the prefix cache
    timings_per_token: bool = False  # llama.cpp's `timings` on the response (and each chunk)


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] | str = Field(min_length=1)  # a string: one user message (mistral.rs)
    max_completion_tokens: Int | None = Field(None, ge=1)  # wins over max_tokens
    logprobs: bool | Int | None = False  # an integer: that many top logprobs (mlx-lm)
    top_logprobs: Int | None = Field(None, ge=0, le=20)
    tools: list[ToolDefinition] | None = None
    tool_choice: str | dict[str, Any] | None = None  # "none" | "auto" | "required" | {"type": "function", ...}
    parallel_tool_calls: bool | None = None
    functions: list[dict[str, Any]] | None = None  # deprecated form of tools
    function_call: str | dict[str, Any] | None = None  # deprecated form of tool_choice
    audio: dict[str, Any] | None = None
    modalities: list[str] | None = None
    # the template's inputs (vLLM, llama.cpp, lmdeploy, mistral.rs)
    chat_template_kwargs: dict[str, Any] | None = None  # extra variables, e.g. enable_thinking
    enable_thinking: bool | None = None  # lmdeploy's and mistral.rs' chat_template_kwargs.enable_thinking
    add_generation_prompt: bool = True  # false: the template does not open the assistant's turn
    # true: special-token text in the request's messages (and tools) becomes control tokens, as the
    # template's own do; by default it is plain text, so a message cannot open a turn of its own
    parse_special: bool = False
    continue_final_message: bool = False  # the reply continues the last (assistant) message


class CompletionRequest(SamplingFields):
    # OpenAI's forms (a string, strings, token ids, lists of ids) and llama.cpp's: a list mixing
    # ids and strings is one prompt; a list of strings and such lists is several.
    prompt: str | list[Int | str | list[Int | str]]
    # OpenAI's documented default for text completions (chat defaults to the remaining context);
    # null asks for the remaining context.
    max_tokens: Int | None = Field(16, ge=1)
    echo: bool | None = False
    logprobs: Int | None = Field(None, ge=0, le=20)
    suffix: str | None = None
    best_of: Int | None = Field(None, ge=1)


class LlamaCompletionRequest(CompletionRequest):
    """llama.cpp's POST /completion: the same fields, its defaults and its answer's shape."""

    max_tokens: Int | None = Field(None, ge=1)  # llama.cpp: until the context ends, unless n_predict says
    return_tokens: bool = False  # the generated token ids in `tokens`


class InfillChunk(_Request):
    filename: str = "tmp"
    text: str = ""


class InfillRequest(LlamaCompletionRequest):
    """llama.cpp's POST /infill: fill the code between input_prefix and input_suffix."""

    prompt: str | list[Int | str | list[Int | str]] = ""  # the start of the middle, if known
    input_prefix: str = ""
    input_suffix: str = ""
    input_extra: list[InfillChunk] = []  # other files, as context


class EmbeddingRequest(_Request):
    """OpenAI's (`input`), or llama.cpp's native form (`content`, answered in its own shape)."""

    input: str | list[str] | list[Int] | list[list[Int]] | None = None
    content: str | list[str] | list[Int] | list[list[Int]] | None = None  # llama.cpp
    embd_normalize: Int = Field(2, ge=-1)  # llama.cpp, with content: -1 none, 0 max-abs, 1 taxicab, 2 L2, p > 2
    model: str | None = None  # missing: the embedding model if one is served, else the chat model
    keep_alive: str | float | None = None  # Ollama's: how long the model stays loaded once idle
    encoding_format: Literal["float", "base64"] | None = "float"  # None: float
    dimensions: Int | None = Field(None, ge=1)  # only the model's own size is accepted
    user: str | None = None


class SlotAction(_Request):
    """POST /slots/{id}?action=save|restore (llama.cpp): the file under --slot-save-path."""

    filename: str | None = None


class ModelAction(_Request):
    """POST /models/load and /models/unload (llama.cpp's router)."""

    model: str


# ---------------------------------------------------------------- llama.cpp's token routes


class TokenizeRequest(_Request):
    """POST /tokenize, as llama.cpp's server takes it."""

    content: str
    add_special: bool = False  # BOS, if the model's tokenizer asks for one
    parse_special: bool = True  # special-token text becomes its id; false: it is plain text
    with_pieces: bool = False
    model: str | None = None


class DetokenizeRequest(_Request):
    tokens: list[Int]
    model: str | None = None
