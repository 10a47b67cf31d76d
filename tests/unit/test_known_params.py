"""The table of the peers' request parameters (requests/known_params.py), checked both ways:
every name the peers document is in it, every honoured name changes what runs, every neutral
name is accepted at its neutral values only, every refused name is refused by name."""

from __future__ import annotations

import pytest

from lmserve.server.errors import APIError
from lmserve.server.protocol import ChatCompletionRequest, CompletionRequest, LlamaCompletionRequest
from lmserve.server.requests.known_params import KNOWN_PARAMS, Handling
from lmserve.server.requests.plan import chat_plan, completion_plan
from tests.helpers.fake_engine import ByteTokenizer

# A template that reads enable_thinking, so chat_template_kwargs has somewhere to go.
TOKENIZER = ByteTokenizer(chat_template="{{ messages }}{{ enable_thinking }}{{ add_generation_prompt }}")
TOOLS = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]

# Names the peers document (their request schemas, as of this writing), beyond OpenAI's own.
LLAMA_CPP = [
    "verbose", "timings_per_token", "stream", "stream_options", "cache_prompt", "return_tokens",
    "return_progress", "sse_ping_interval", "n_predict", "n_indent", "n_keep", "n_discard", "n_cmpl",
    "n_cache_reuse", "t_max_prompt_ms", "t_max_predict_ms", "response_fields", "top_k", "top_p", "min_p",
    "top_n_sigma", "xtc_probability", "xtc_threshold", "typical_p", "temperature", "dynatemp_range",
    "dynatemp_exponent", "repeat_last_n", "repeat_penalty", "frequency_penalty", "presence_penalty",
    "dry_multiplier", "dry_base", "dry_allowed_length", "dry_penalty_last_n", "mirostat", "mirostat_tau",
    "mirostat_eta", "adaptive_target", "adaptive_decay", "seed", "n_probs", "min_keep", "backend_sampling",
    "post_sampling_probs", "speculative.n_max", "speculative.n_min", "speculative.p_min", "speculative.type",
    "lora", "dry_sequence_breakers", "json_schema", "grammar", "grammar_lazy", "chat_format",
    "reasoning_format", "parse_tool_calls", "continue_final_message", "echo", "preserved_tokens",
    "grammar_triggers", "reasoning_budget_tokens", "reasoning_budget_message", "logit_bias", "ignore_eos",
    "stop", "samplers", "id_slot", "chat_template_kwargs", "add_generation_prompt", "penalize_nl", "tfs_z",
    "thinking_forced_open",
]
VLLM = [
    "best_of", "use_beam_search", "top_k", "min_p", "repetition_penalty", "length_penalty", "stop_token_ids",
    "include_stop_str_in_output", "ignore_eos", "min_tokens", "skip_special_tokens",
    "spaces_between_special_tokens", "truncate_prompt_tokens", "prompt_logprobs", "allowed_token_ids",
    "bad_words", "echo", "add_generation_prompt", "continue_final_message", "add_special_tokens",
    "documents", "chat_template", "chat_template_kwargs", "mm_processor_kwargs", "guided_json",
    "guided_regex", "guided_choice", "guided_grammar", "structured_outputs", "guided_decoding_backend",
    "guided_whitespace_pattern", "priority", "request_id", "logits_processors", "return_tokens_as_token_ids",
    "return_token_ids", "cache_salt", "kv_transfer_params", "vllm_xargs", "thinking_token_budget",
    "include_reasoning", "repetition_detection", "stream_interval", "truncation_side", "watermarking",
    "logprob_token_ids", "ec_transfer_params", "prompt_embeds", "mm_payload", "media_io_kwargs",
    "return_mm_kwargs", "return_prompt_text", "return_token_offsets", "return_weight_versions",
    "routed_experts_prompt_start",
]
MLX_LM = ["role_mapping", "repetition_penalty", "repetition_context_size", "logit_bias", "logprobs",
          "top_k", "min_p", "adapters", "draft_model", "num_draft_tokens", "xtc_probability", "xtc_threshold",
          "frequency_context_size", "presence_context_size"]
MISTRAL_RS = ["top_k", "min_p", "repetition_penalty", "dry_multiplier", "dry_base", "dry_allowed_length",
              "dry_sequence_breakers", "grammar", "adapters", "truncate_sequence", "web_search_options",
              "enable_thinking", "tool_schemas", "adapter", "agent_permission", "code_execution_permission",
              "enable_shell", "files", "max_tool_rounds", "session_id"]
LMDEPLOY = ["session_id", "repetition_penalty", "min_new_tokens", "do_preprocess", "skip_special_tokens",
            "spaces_between_special_tokens", "enable_thinking", "top_k", "min_p", "ignore_eos",
            "include_stop_str_in_output", "interactive_mode", "adapter_name", "cancel", "image_data",
            "image_url", "input_ids", "repetition_ngram_size", "repetition_ngram_threshold", "request_output_len",
            "return_logprob", "return_routed_experts", "return_token_ids", "stop_token_ids", "media_io_kwargs",
            "mm_processor_kwargs"]
LLLMS = ["repeat_penalty_num", "top_k", "min_p", "repeat_penalty"]
OLLAMA_OPTIONS = [
    "num_keep", "seed", "num_predict", "top_k", "top_p", "min_p", "typical_p", "repeat_last_n", "temperature",
    "repeat_penalty", "presence_penalty", "frequency_penalty", "penalize_newline", "stop", "numa", "num_ctx",
    "num_batch", "num_gpu", "main_gpu", "use_mmap", "num_thread", "mirostat", "mirostat_tau", "mirostat_eta",
    "tfs_z", "keep_alive", "draft_num_predict",
]
OLLAMA_API = ["_debug_render_only", "context", "format", "images", "options", "raw", "reasoning", "shift",
              "system", "template", "think", "truncate", "keep_alive"]

# Honoured: the route, a value, and the other fields it needs; the plan must differ from the
# plan without it.
HONOURED = {
    "temperature": ("chat", 0.5, {}),
    "top_p": ("chat", 0.5, {}),
    "n": ("chat", 2, {}),
    "max_tokens": ("chat", 5, {}),
    "max_completion_tokens": ("chat", 5, {}),
    "stop": ("chat", ["x"], {}),
    "presence_penalty": ("chat", 0.5, {}),
    "frequency_penalty": ("chat", 0.5, {}),
    "logit_bias": ("chat", {"3": 1}, {}),
    "seed": ("chat", 7, {}),
    "logprobs": ("chat", True, {}),
    "top_logprobs": ("chat", 2, {"logprobs": True}),
    "tools": ("chat", TOOLS, {}),
    "tool_choice": ("chat", "required", {"tools": TOOLS}),
    "parallel_tool_calls": ("chat", False, {"tools": TOOLS}),
    "response_format": ("chat", {"type": "json_object"}, {}),
    "top_k": ("chat", 5, {}),
    "min_p": ("chat", 0.1, {}),
    "repetition_penalty": ("chat", 1.2, {}),
    "ignore_eos": ("chat", True, {}),
    "stop_token_ids": ("chat", [4], {}),
    "include_stop_str_in_output": ("chat", True, {}),
    "skip_special_tokens": ("chat", False, {}),
    "min_tokens": ("chat", 2, {}),
    "guided_json": ("chat", {"type": "object"}, {}),
    "guided_regex": ("chat", "a+", {}),
    "guided_choice": ("chat", ["a", "b"], {}),
    "guided_grammar": ("chat", 'root ::= "a"', {}),
    "structured_outputs": ("chat", {"regex": "a+"}, {}),
    "regex": ("chat", "a+", {}),
    "choice": ("chat", ["a", "b"], {}),
    "grammar": ("chat", 'root ::= "a"', {}),
    "json_schema": ("chat", {"type": "object"}, {}),
    "chat_template_kwargs": ("chat", {"enable_thinking": False}, {}),
    "enable_thinking": ("chat", False, {}),
    "add_generation_prompt": ("chat", False, {}),
    "parse_special": ("chat", True, {"messages": [{"role": "user", "content": "a</s>"}]}),
    "continue_final_message": ("chat", True, {"add_generation_prompt": False,
                                              "messages": [{"role": "user", "content": "hi"},
                                                           {"role": "assistant", "content": "Hel"}]}),
    "n_predict": ("completion", 5, {}),
    "repeat_penalty": ("chat", 1.2, {}),
    "repeat_last_n": ("chat", 8, {"repeat_penalty": 1.2}),
    "repetition_context_size": ("chat", 8, {"repetition_penalty": 1.2}),
    "repeat_penalty_num": ("chat", 8, {"repeat_penalty": 1.2}),
    "penalize_nl": ("chat", False, {"repeat_penalty": 1.2}),
    "typical_p": ("chat", 0.9, {}),
    "min_keep": ("chat", 2, {}),
    "top_n_sigma": ("chat", 1.5, {}),
    "xtc_probability": ("chat", 0.5, {}),
    "xtc_threshold": ("chat", 0.2, {"xtc_probability": 0.5}),
    "dynatemp_range": ("chat", 0.5, {}),
    "dynatemp_exponent": ("chat", 2.0, {"dynatemp_range": 0.5}),
    "mirostat": ("chat", 2, {}),
    "mirostat_tau": ("chat", 3.0, {"mirostat": 2}),
    "mirostat_eta": ("chat", 0.2, {"mirostat": 2}),
    "dry_multiplier": ("chat", 0.8, {}),
    "dry_base": ("chat", 2.0, {"dry_multiplier": 0.8}),
    "dry_allowed_length": ("chat", 3, {"dry_multiplier": 0.8}),
    "dry_penalty_last_n": ("chat", 16, {"dry_multiplier": 0.8}),
    "dry_sequence_breakers": ("chat", ["x"], {"dry_multiplier": 0.8}),
    "samplers": ("chat", ["top_k", "temperature"], {}),
    "n_probs": ("chat", 3, {}),
    "post_sampling_probs": ("chat", True, {"n_probs": 3}),
    "cache_prompt": ("chat", False, {}),
    "min_new_tokens": ("chat", 2, {}),
    "echo": ("completion", True, {}),
}
# Honoured where the plan does not show it: by the route or the response.
HONOURED_ELSEWHERE = {
    "model": "picks the model (tests/unit/test_server_api.py)",
    "messages": "the conversation", "prompt": "the prompt",
    "stream": "SSE instead of one body", "stream_options": "usage on the last chunk",
    "keep_alive": "how long the model stays loaded (tests/unit/test_fleet.py)",
    "functions": "refused unless function_call is none", "function_call": "none and auto only",
    "audio": "refused (text only)", "modalities": "refused unless text",
    "suffix": "insertion, for models with fill-in-the-middle tokens",
    "best_of": "equal to n only", "id_slot": "the slot a request runs in (/slots)",
    "timings_per_token": "timings on the response",
    "return_tokens": "token ids on llama.cpp's /completion response",
}
# Neutral: values accepted, then a value refused by name.
NEUTRAL = {
    "tfs_z": ([1.0, 1], 0.9), "n_keep": ([0, -1], 10), "n_discard": ([0], 4), "n_indent": ([0], 2),
    "n_cache_reuse": ([0], 256), "t_max_prompt_ms": ([0, -1], 1000), "t_max_predict_ms": ([0, -1], 1000),
    "return_progress": ([False], True), "verbose": ([False], True), "backend_sampling": ([False], True),
    "adaptive_target": ([-1, -1.0], 0.5), "lora": ([[]], [{"id": 0, "scale": 1.0}]),
    "reasoning_format": (["auto", "deepseek"], "none"), "thinking_forced_open": ([False], True),
    "parse_tool_calls": ([True], False), "reasoning_budget_tokens": ([-1], 100),
    "use_beam_search": ([False], True), "length_penalty": ([1.0], 0.5), "early_stopping": ([False], True),
    "prompt_logprobs": ([0], 1), "spaces_between_special_tokens": ([True], False), "priority": ([0], 1),
    "return_tokens_as_token_ids": ([False], True), "return_token_ids": ([False], True),
    "store": ([False], True), "truncate_sequence": ([False], True), "session_id": ([-1], 7),
    "do_preprocess": ([True], False), "interactive_mode": ([False], True), "num_keep": ([0, -1], 5),
    "include_reasoning": ([True], False), "return_mm_kwargs": ([False], True), "return_prompt_text": ([False], True),
    "return_token_offsets": ([False], True), "return_weight_versions": ([False], True),
    "return_routed_experts": ([False], True), "cancel": ([False], True), "shift": ([False], True),
}
NEUTRAL_ANY = [
    "sse_ping_interval", "adaptive_decay", "speculative.n_max", "speculative.n_min", "speculative.p_min",
    "speculative.type", "reasoning_budget_message", "request_id", "cache_salt", "service_tier", "metadata",
    "user", "guided_decoding_backend", "num_draft_tokens", "num_batch", "num_gpu", "main_gpu", "num_thread",
    "use_mmap", "numa", "draft_num_predict", "stream_interval",
]
REFUSED = [
    "grammar_lazy", "grammar_triggers", "preserved_tokens", "chat_format", "response_fields", "n_cmpl",
    "allowed_token_ids", "bad_words", "truncate_prompt_tokens", "add_special_tokens", "documents",
    "chat_template", "mm_processor_kwargs", "kv_transfer_params", "vllm_xargs", "logits_processors",
    "thinking_token_budget", "guided_whitespace_pattern", "guided_decoding", "reasoning_effort", "prediction",
    "web_search_options", "verbosity", "role_mapping", "adapters", "draft_model", "tool_schemas", "dry_params",
    "num_predict", "penalize_newline", "num_ctx", "options",
    "repetition_detection", "truncation_side", "watermarking", "logprob_token_ids", "ec_transfer_params",
    "prompt_embeds", "mm_payload", "media_io_kwargs", "routed_experts_prompt_start", "frequency_context_size",
    "presence_context_size", "adapter", "agent_permission", "code_execution_permission", "enable_shell", "files",
    "max_tool_rounds", "adapter_name", "image_data", "image_url", "input_ids", "repetition_ngram_size",
    "repetition_ngram_threshold", "request_output_len", "return_logprob", "_debug_render_only", "context",
    "format", "images", "raw", "reasoning", "system", "template", "think", "truncate",
]


def plan(route: str, fields: dict, grammar=None):
    if route == "chat":
        body = {"messages": [{"role": "user", "content": "hi"}], **fields}
        return chat_plan(ChatCompletionRequest.model_validate(body, strict=False), "r", TOKENIZER, 2000, grammar)
    body = {"prompt": "hi", **fields}
    return completion_plan(CompletionRequest.model_validate(body, strict=False), "r", TOKENIZER, 2000, grammar)


def refused_as(route: str, fields: dict, name: str) -> APIError:
    with pytest.raises(APIError) as caught:
        plan(route, fields)
    assert (caught.value.status_code, caught.value.param) == (400, name)
    return caught.value


def test_every_peer_name_is_in_the_table():
    openai = set(ChatCompletionRequest.model_fields) | set(CompletionRequest.model_fields)
    documented = set(LLAMA_CPP + VLLM + MLX_LM + MISTRAL_RS + LMDEPLOY + LLLMS + OLLAMA_OPTIONS + OLLAMA_API)
    assert sorted(documented - set(KNOWN_PARAMS) - openai) == []


def test_the_table_says_what_the_tests_check():
    assert {n for n, p in KNOWN_PARAMS.items() if p.handling is Handling.HONOURED} == (
        set(HONOURED) | set(HONOURED_ELSEWHERE))
    neutral = {n for n, p in KNOWN_PARAMS.items() if p.handling is Handling.NEUTRAL}
    assert neutral == set(NEUTRAL) | set(NEUTRAL_ANY)
    assert {n for n, p in KNOWN_PARAMS.items() if p.handling is Handling.REFUSED} == set(REFUSED)


def test_honoured_names_are_the_declared_fields():
    schemas = (ChatCompletionRequest, CompletionRequest, LlamaCompletionRequest)
    declared = {field.alias or name for schema in schemas for name, field in schema.model_fields.items()}
    honoured = {n for n, p in KNOWN_PARAMS.items() if p.handling is Handling.HONOURED}
    assert declared == honoured


@pytest.mark.parametrize("name", sorted(HONOURED))
def test_an_honoured_name_changes_the_plan(name, grammar_compiler):
    route, value, needs = HONOURED[name]
    assert plan(route, {**needs, name: value}, grammar_compiler) != plan(route, needs, grammar_compiler)


@pytest.mark.parametrize("name", sorted(NEUTRAL))
def test_a_neutral_name_is_accepted_at_its_neutral_values_only(name):
    accepted, changing = NEUTRAL[name]
    for route in ("chat", "completion"):
        for value in accepted:
            assert plan(route, {name: value}) == plan(route, {})
        error = refused_as(route, {name: changing}, name)
        assert error.code == "unsupported_parameter" and repr(changing) in error.message


@pytest.mark.parametrize("name", NEUTRAL_ANY)
def test_a_name_that_never_changes_output_is_accepted_with_any_value(name):
    assert plan("chat", {name: "anything"}) == plan("chat", {})


@pytest.mark.parametrize("name", REFUSED)
def test_a_refused_name_is_refused_by_name(name):
    for route in ("chat", "completion"):
        error = refused_as(route, {name: 1}, name)
        assert error.code == "unsupported_parameter" and name in error.message


def test_a_true_does_not_pass_for_a_neutral_one_nor_zero_for_false():
    refused_as("chat", {"tfs_z": True}, "tfs_z")
    refused_as("chat", {"return_progress": 0}, "return_progress")


def test_names_no_peer_documents_stay_tolerated():
    assert plan("chat", {"x_custom_field": 3}) == plan("chat", {})


def test_usage_on_every_chunk_is_refused_by_name():
    fields = {"stream": True, "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    refused_as("chat", fields, "stream_options.continuous_usage_stats")


def test_synonyms_that_disagree_are_refused_and_windows_are_honoured():
    params = plan("chat", {"repeat_penalty": 1.3, "repeat_penalty_num": 8}).choices[0].params
    assert (params.repetition_penalty, params.repetition_window) == (1.3, 8)
    assert plan("chat", {"repeat_penalty": 1.3}).choices[0].params.repetition_window == 64  # llama.cpp's default
    assert plan("chat", {"repetition_penalty": 1.3}).choices[0].params.repetition_window == 0  # vLLM's: all
    assert plan("chat", {"repeat_penalty": 1.3, "repeat_last_n": 0}).choices[0].params.repetition_penalty == 1.0
    refused_as("chat", {"repeat_penalty": 1.3, "repetition_penalty": 1.5}, "repetition_penalty")
    refused_as("chat", {"min_tokens": 2, "min_new_tokens": 3}, "min_new_tokens")


def test_peer_shapes_of_messages_stop_and_logprobs():
    as_string = plan("chat", {"messages": "hi"})
    assert as_string.prompts == plan("chat", {}).prompts  # one user message
    params = plan("chat", {"stop": [4, 5]}).choices[0].params
    assert (params.stop, params.stop_token_ids) == ((), (4, 5))
    assert plan("chat", {"logprobs": 3}).choices[0].params.logprobs == 3  # mlx-lm: a count
    assert plan("chat", {"logprobs": True, "top_logprobs": 2}).choices[0].params.logprobs == 2
    assert plan("chat", {"seed": -1}).choices[0].params.seed is None
    refused_as("chat", {"logprobs": 21}, "logprobs")


@pytest.mark.parametrize(("route", "name", "value"), [
    ("chat", "echo", True), ("chat", "suffix", "x"), ("chat", "prompt", "x"), ("chat", "return_tokens", True),
    ("completion", "tools", TOOLS), ("completion", "messages", [{"role": "user", "content": "x"}]),
    ("completion", "chat_template_kwargs", {"enable_thinking": True}), ("completion", "return_tokens", True),
])
def test_a_name_honoured_on_another_route_is_refused_here(route, name, value):
    error = refused_as(route, {name: value}, name)
    assert error.code == "unsupported_parameter" and "not supported on" in error.message


def test_an_empty_or_false_value_of_another_routes_name_changes_nothing_and_passes():
    assert plan("chat", {"echo": False, "return_tokens": False}) == plan("chat", {})
    assert plan("completion", {"tools": []}) == plan("completion", {})
