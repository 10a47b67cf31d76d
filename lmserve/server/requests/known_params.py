"""The request parameters the peers document, and what lmserve does with each.

One table for the chat and text completion routes. A name is either
- HONOURED: a field of the request schema (protocol/requests.py), mapped onto the engine;
- NEUTRAL: accepted only with values that change nothing here (what front ends always send,
  such as llama.cpp's `tfs_z: 1.0`); any other value is refused by name with a 400;
- REFUSED: any value other than null is refused by name with a 400.
Names no peer documents stay tolerated, as OpenAI's own server tolerates them.

Peers: OpenAI, llama.cpp's server, vLLM's OpenAI server, mlx-lm's server, mistral.rs,
lmdeploy's api_server, lllms and Ollama (its `options` names).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

from lmserve.server.errors import APIError, bad_request


class Handling(enum.Enum):
    HONOURED = "honoured"
    NEUTRAL = "neutral"
    REFUSED = "refused"


ANY = object()  # NEUTRAL for every value: the parameter changes speed or bookkeeping, never output


@dataclass(frozen=True)
class KnownParam:
    handling: Handling
    neutral: tuple[Any, ...] = ()  # NEUTRAL: the values accepted (ANY: all of them)
    why: str = ""  # NEUTRAL/REFUSED: what the 400 says (or why any value is accepted)


def _honoured() -> KnownParam:
    return KnownParam(Handling.HONOURED)


def _neutral(*values: Any, why: str) -> KnownParam:
    return KnownParam(Handling.NEUTRAL, values, why)


def _refused(why: str) -> KnownParam:
    return KnownParam(Handling.REFUSED, (), why)


_HONOURED = (
    # OpenAI
    "model", "messages", "prompt", "temperature", "top_p", "n", "max_tokens", "max_completion_tokens",
    "stop", "stream", "stream_options", "presence_penalty", "frequency_penalty", "logit_bias", "seed",
    "logprobs", "top_logprobs", "tools", "tool_choice", "parallel_tool_calls", "functions",
    "function_call", "response_format", "echo", "suffix", "best_of", "audio", "modalities",
    # vLLM
    "top_k", "min_p", "repetition_penalty", "ignore_eos", "stop_token_ids", "include_stop_str_in_output",
    "skip_special_tokens", "min_tokens", "guided_json", "guided_regex", "guided_choice", "guided_grammar",
    "structured_outputs", "regex", "choice", "chat_template_kwargs",
    "add_generation_prompt", "continue_final_message",
    # llama.cpp
    "n_predict", "repeat_penalty", "repeat_last_n", "penalize_nl", "typical_p", "min_keep", "top_n_sigma",
    "xtc_probability", "xtc_threshold", "dynatemp_range", "dynatemp_exponent", "mirostat", "mirostat_tau",
    "mirostat_eta", "dry_multiplier", "dry_base", "dry_allowed_length", "dry_penalty_last_n",
    "dry_sequence_breakers", "samplers", "n_probs", "post_sampling_probs", "id_slot", "cache_prompt",
    "timings_per_token", "grammar", "json_schema", "return_tokens",
    # mlx-lm, lmdeploy, mistral.rs, Ollama
    "repetition_context_size", "min_new_tokens", "enable_thinking", "keep_alive", "repeat_penalty_num",
    # lmserve (llama.cpp's name on /tokenize): the request's special-token text becomes control tokens
    "parse_special",
)

# Reasons several parameters give.
_MULTIMODAL = "multimodal inputs are not supported"
_SPECULATIVE = "speculative decoding settings change speed, never output"
_LOAD_TIME = "a load-time setting that changes speed, never output"
_NO_TRUNCATION = "prompts are never truncated; a long one is a 400"
_AGENTIC = "agentic tool execution is not supported"
_LAZY_GRAMMAR = "lazy grammars are internal to llama.cpp; use tools or grammar"
_ADAPTERS = "adapters are not supported"
_SESSIONS = "sessions are not supported on this route"
_KEEPS_PROMPT = "lmserve never shifts the context, so it keeps every prompt token (0 or -1)"
_CHAT_TEMPLATE = "a per-request chat template is not supported; start the server with --chat-template-file"
_REASONING_EFFORT = "reasoning effort is not supported"

KNOWN_PARAMS: dict[str, KnownParam] = {name: _honoured() for name in _HONOURED} | {
    # llama.cpp: accepted at the values its front ends send by default
    "tfs_z": _neutral(1.0, why="tail-free sampling (llama.cpp removed it); only 1.0 (off) is accepted"),
    "n_keep": _neutral(0, -1, why=_KEEPS_PROMPT),
    "n_discard": _neutral(0, why="lmserve never shifts the context"),
    "n_indent": _neutral(0, why="minimum line indentation is not supported; only 0 is accepted"),
    "n_cache_reuse": _neutral(0, why="KV shifting is not supported; prefixes are reused by the prefix cache"),
    "t_max_prompt_ms": _neutral(0, -1, why="time limits are not supported; only 0 (off) is accepted"),
    "t_max_predict_ms": _neutral(0, -1, why="time limits are not supported; only 0 (off) is accepted"),
    "return_progress": _neutral(False, why="prompt progress events are not sent"),
    "verbose": _neutral(False, why="the __verbose debug field is not sent"),
    "sse_ping_interval": _neutral(ANY, why="SSE keep-alive pings change no output"),
    "backend_sampling": _neutral(False, why="sampling always runs in lmserve's own sampler"),
    "adaptive_target": _neutral(-1, -1.0, why="the adaptive-p sampler is not supported; only -1 (off)"),
    "adaptive_decay": _neutral(ANY, why="only read by adaptive-p, which stays off"),
    "lora": _neutral((), why="LoRA adapters are not supported; only an empty list"),
    "speculative.n_max": _neutral(ANY, why=_SPECULATIVE),
    "speculative.n_min": _neutral(ANY, why=_SPECULATIVE),
    "speculative.p_min": _neutral(ANY, why=_SPECULATIVE),
    "speculative.type": _neutral(ANY, why=_SPECULATIVE),
    "reasoning_format": _neutral("auto", "deepseek", why="reasoning is always split into reasoning_content"),
    "thinking_forced_open": _neutral(False, why="the template decides whether thinking is open"),
    "parse_tool_calls": _neutral(True, why="tool calls are always parsed when tools are offered"),
    "grammar_lazy": _refused(_LAZY_GRAMMAR),
    "grammar_triggers": _refused(_LAZY_GRAMMAR),
    "preserved_tokens": _refused(_LAZY_GRAMMAR),
    "chat_format": _refused("llama.cpp's internal chat format; the model's template decides"),
    "reasoning_budget_tokens": _neutral(-1, why="reasoning budgets are not supported; only -1 (off)"),
    "reasoning_budget_message": _neutral(ANY, why="only read with a reasoning budget, which stays off"),
    "response_fields": _refused("response field selection is not supported"),
    "n_cmpl": _refused("use n"),
    # vLLM
    "use_beam_search": _neutral(False, why="beam search is not supported"),
    "length_penalty": _neutral(1.0, why="only used by beam search, which is not supported"),
    "early_stopping": _neutral(False, why="only used by beam search, which is not supported"),
    "prompt_logprobs": _neutral(0, why="prompt logprobs are not supported"),
    "allowed_token_ids": _refused("allowed_token_ids is not supported; use logit_bias or a grammar"),
    "bad_words": _refused("bad_words is not supported; use logit_bias"),
    "truncate_prompt_tokens": _refused(_NO_TRUNCATION),
    "spaces_between_special_tokens": _neutral(True, why="special tokens are always joined with spaces as vLLM does"),
    "add_special_tokens": _refused("the chat template places the special tokens"),
    "documents": _refused("documents (RAG templates) are not supported"),
    "chat_template": _refused(_CHAT_TEMPLATE),
    "mm_processor_kwargs": _refused(_MULTIMODAL),
    "priority": _neutral(0, why="priority scheduling is not supported; only 0"),
    "request_id": _neutral(ANY, why="an id for logs only"),
    "cache_salt": _neutral(ANY, why="changes which prefixes are shared, never output"),
    "kv_transfer_params": _refused("KV transfer between servers is not supported"),
    "vllm_xargs": _refused("vLLM's extra arguments are not supported"),
    "logits_processors": _refused("custom logits processors are not supported"),
    "return_tokens_as_token_ids": _neutral(False, why="tokens are returned as text"),
    "return_token_ids": _neutral(False, why="token ids are returned only by llama.cpp's /completion (return_tokens)"),
    "thinking_token_budget": _refused("thinking budgets are not supported"),
    "guided_decoding_backend": _neutral(ANY, why="one constrained-decoding backend here, the same output"),
    "guided_whitespace_pattern": _refused("a custom whitespace pattern is not supported"),
    "guided_decoding": _refused("use response_format or structured_outputs"),
    "reasoning_effort": _refused(_REASONING_EFFORT),
    "prediction": _refused("predicted outputs are not supported"),
    "web_search_options": _refused("web search is not supported"),
    "verbosity": _refused("verbosity is not supported"),
    "service_tier": _neutral(ANY, why="one tier here"),
    "user": _neutral(ANY, why="an end-user id for abuse tracking; changes no output"),
    "store": _neutral(False, why="completions are not stored"),
    "metadata": _neutral(ANY, why="stored with nothing: completions are not stored"),
    # mlx-lm
    "role_mapping": _refused("role_mapping is not supported; the model's chat template decides"),
    "adapters": _refused(_ADAPTERS),
    "draft_model": _refused("a per-request draft model is not supported"),
    "num_draft_tokens": _neutral(ANY, why=_SPECULATIVE),
    # mistral.rs
    "truncate_sequence": _neutral(False, why=_NO_TRUNCATION),
    "tool_schemas": _refused("use tools"),
    "dry_params": _refused("send dry_multiplier, dry_base, dry_allowed_length and dry_sequence_breakers"),
    # lmdeploy
    "session_id": _neutral(-1, why=_SESSIONS),
    "do_preprocess": _neutral(True, why="the chat template is always applied"),
    "interactive_mode": _neutral(False, why=_SESSIONS),
    # Ollama (its options)
    "num_predict": _refused("send max_tokens (or n_predict)"),
    "num_keep": _neutral(0, -1, why=_KEEPS_PROMPT),
    "penalize_newline": _refused("send penalize_nl"),
    "num_ctx": _refused("the context size is set at start-up (-c / --max-model-len)"),
    "num_batch": _neutral(ANY, why=_LOAD_TIME),
    "num_gpu": _neutral(ANY, why=_LOAD_TIME),
    "main_gpu": _neutral(ANY, why=_LOAD_TIME),
    "num_thread": _neutral(ANY, why=_LOAD_TIME),
    "use_mmap": _neutral(ANY, why=_LOAD_TIME),
    "numa": _neutral(ANY, why=_LOAD_TIME),
    "options": _refused("Ollama's options object is not read here; send its fields at the top level"),
    "draft_num_predict": _neutral(ANY, why=_SPECULATIVE),
    # vLLM, newer
    "include_reasoning": _neutral(True, why="reasoning is always returned, in reasoning_content"),
    "repetition_detection": _refused("repetition detection is not supported; use repeat_penalty or DRY"),
    "stream_interval": _neutral(ANY, why="how often chunks are sent, never what they say"),
    "truncation_side": _refused(_NO_TRUNCATION),
    "watermarking": _refused("watermarking is not supported"),
    "logprob_token_ids": _refused("logprobs of chosen token ids are not supported; use top_logprobs"),
    "ec_transfer_params": _refused("encoder cache transfer is not supported"),
    "prompt_embeds": _refused("prompt embeddings are not supported; send text or token ids"),
    "mm_payload": _refused(_MULTIMODAL),
    "media_io_kwargs": _refused(_MULTIMODAL),
    "return_mm_kwargs": _neutral(False, why=_MULTIMODAL),
    "return_prompt_text": _neutral(False, why="the prompt text is not returned on this route"),
    "return_token_offsets": _neutral(False, why="token offsets are not returned"),
    "return_weight_versions": _neutral(False, why="weight versions are not returned"),
    "routed_experts_prompt_start": _refused("expert routing is not reported"),
    "return_routed_experts": _neutral(False, why="expert routing is not reported"),
    # mlx-lm, newer
    "frequency_context_size": _refused("frequency_penalty counts the whole output here; a window is not supported"),
    "presence_context_size": _refused("presence_penalty counts the whole output here; a window is not supported"),
    # mistral.rs' agents
    "adapter": _refused(_ADAPTERS),
    "agent_permission": _refused(_AGENTIC),
    "code_execution_permission": _refused(_AGENTIC),
    "enable_shell": _refused(_AGENTIC),
    "files": _refused("file inputs are not supported"),
    "max_tool_rounds": _refused(_AGENTIC),
    # lmdeploy
    "adapter_name": _refused(_ADAPTERS),
    "cancel": _neutral(False, why=_SESSIONS),
    "image_data": _refused(_MULTIMODAL),
    "image_url": _refused(_MULTIMODAL),
    "input_ids": _refused("send token ids as the prompt of /v1/completions"),
    "repetition_ngram_size": _refused("n-gram repetition limits are not supported; use DRY"),
    "repetition_ngram_threshold": _refused("n-gram repetition limits are not supported; use DRY"),
    "request_output_len": _refused("send max_tokens"),
    "return_logprob": _refused("send logprobs"),
    # Ollama's own API fields, sent to its OpenAI routes by some clients
    "_debug_render_only": _refused("rendering without generating is not supported; see /apply-template"),
    "context": _refused("Ollama's context tokens are not supported; the prefix cache reuses prompts"),
    "format": _refused("send response_format"),
    "images": _refused(_MULTIMODAL),
    "raw": _refused("use /v1/completions for a prompt without the chat template"),
    "reasoning": _refused(_REASONING_EFFORT),
    "shift": _neutral(False, why="lmserve never shifts the context; a prompt too long is a 400"),
    "system": _refused("send a system message"),
    "template": _refused(_CHAT_TEMPLATE),
    "think": _refused("send chat_template_kwargs: {enable_thinking: ...}"),
    "truncate": _refused(_NO_TRUNCATION),
}


def check_known_params(extras: dict[str, Any], route: str) -> None:
    """Refuse, by name, each field the route's schema does not declare (its `extras`) that the
    table refuses, or sends with a value that is not neutral. A name honoured on another route
    (`echo` on chat, `tools` on completions, `return_tokens` outside llama.cpp's /completion) is
    refused here unless its value is empty or false."""
    for name, value in extras.items():
        known = KNOWN_PARAMS.get(name)
        if known is None or value is None:
            continue
        if known.handling is Handling.HONOURED:
            if value in (False, "", [], {}):
                continue
            raise bad_request(f"'{name}' is not supported on {route}", param=name, code="unsupported_parameter")
        if known.handling is Handling.NEUTRAL and _is_neutral(value, known.neutral):
            continue
        raise _refusal(name, value, known)


def _is_neutral(value: Any, neutral: tuple[Any, ...]) -> bool:
    if ANY in neutral:
        return True
    if isinstance(value, list):
        value = tuple(value)
    # bool is an int in Python: True must not pass for 1, nor 0 for False.
    return any(type(value) is type(v) or _both_numbers(value, v) for v in neutral if value == v)


def _both_numbers(a: Any, b: Any) -> bool:
    return all(isinstance(x, int | float) and not isinstance(x, bool) for x in (a, b))


def _refusal(name: str, value: Any, known: KnownParam) -> APIError:
    if known.handling is Handling.NEUTRAL:
        accepted = " or ".join(repr(v) for v in known.neutral)
        message = f"'{name}': {value!r} is not supported by lmserve: {known.why} (accepted: {accepted})"
    else:
        message = f"'{name}' is not supported by lmserve: {known.why}"
    return bad_request(message, param=name, code="unsupported_parameter")
