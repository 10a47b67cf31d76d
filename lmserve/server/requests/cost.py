"""What one request may cost: bounds on the parts of a request whose work grows with their size,
each refused with a 400 that names the limit and its value.

The admission gate (server/admission.py) shares the engine fairly between requests; these keep a
single request from being a denial of service on its own (100,000 stop strings are matched
against every token of every choice; a whole-vocabulary logit_bias is applied at every step of
every choice; thousands of prompts times n queue that many sequences). Each default sits well
above what clients send, and above OpenAI's own limits where it has one, so that no client
written against OpenAI or llama.cpp meets it.
"""

from __future__ import annotations

from dataclasses import dataclass

from lmserve.server.errors import APIError, bad_request


@dataclass(frozen=True, kw_only=True)
class CostLimits:
    # OpenAI caps n at 128 (as the schema here does); two prompts at that n, or 256 batched prompts.
    max_sequences: int = 256  # n x the number of prompts
    # 128 choices of 16k tokens, or 16 of a 128k context: a long batch job, not an accident.
    max_sequence_tokens: int = 2**21  # max_tokens summed over the sequences (n x max_tokens per prompt)
    max_stop_strings: int = 256  # OpenAI takes 4; front ends send a few dozen at most
    max_stop_string_chars: int = 4096  # stop strings are words or markers, not documents
    max_stop_token_ids: int = 1024  # a few end-of-turn tokens in practice
    max_logit_bias: int = 1024  # token biases, text keys counted by their tokens; OpenAI takes 300
    max_tools: int = 256  # OpenAI takes 128
    max_messages: int = 4096  # OpenAI takes 2048


COST_LIMITS = CostLimits()


def over_limit(what: str, value: int, limit: str, param: str, limits: CostLimits = COST_LIMITS) -> APIError:
    """A 400: `what` is `value`, above `limit` (the CostLimits field's name)."""
    bound = getattr(limits, limit)
    return bad_request(f"{what} is {value}, above this server's limit of {bound} ({limit})", param=param,
                       code="request_too_costly")


def check_sequences(num_prompts: int, n: int, limits: CostLimits = COST_LIMITS) -> None:
    if num_prompts * n > limits.max_sequences:
        param = "prompt" if num_prompts > 1 else "n"
        raise over_limit(f"n x the number of prompts ({n} x {num_prompts})", num_prompts * n, "max_sequences", param,
                         limits)


def check_sequence_tokens(max_tokens: list[int], param: str, limits: CostLimits = COST_LIMITS) -> None:
    """`max_tokens`: each sequence's, as planned (the rest of the context when the request set none)."""
    total = sum(max_tokens)
    if total > limits.max_sequence_tokens:
        raise over_limit(f"n x {param}, summed over the prompts,", total, "max_sequence_tokens", param, limits)


def check_stop_strings(strings: tuple[str, ...], limits: CostLimits = COST_LIMITS) -> None:
    if len(strings) > limits.max_stop_strings:
        raise over_limit("the number of stop strings", len(strings), "max_stop_strings", "stop", limits)
    longest = max(map(len, strings), default=0)
    if longest > limits.max_stop_string_chars:
        raise over_limit("the length of a stop string (in characters)", longest, "max_stop_string_chars", "stop",
                         limits)


def check_stop_token_ids(token_ids: list[int], param: str, limits: CostLimits = COST_LIMITS) -> None:
    if len(token_ids) > limits.max_stop_token_ids:
        raise over_limit("the number of stop token ids", len(token_ids), "max_stop_token_ids", param, limits)


def check_logit_bias(num_biases: int, limits: CostLimits = COST_LIMITS) -> None:
    if num_biases > limits.max_logit_bias:
        raise over_limit("the number of logit_bias entries", num_biases, "max_logit_bias", "logit_bias", limits)


def check_chat_size(num_messages: int, num_tools: int, limits: CostLimits = COST_LIMITS) -> None:
    if num_messages > limits.max_messages:
        raise over_limit("the number of messages", num_messages, "max_messages", "messages", limits)
    if num_tools > limits.max_tools:
        raise over_limit("the number of tools", num_tools, "max_tools", "tools", limits)
