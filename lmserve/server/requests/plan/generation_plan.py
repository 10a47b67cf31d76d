"""What the engine runs for one API request: a GenerationPlan of prompts and choices, n per
prompt, each with its max_tokens fitted to the context its prompt leaves and a seed of its own.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from lmserve.parsing import ReplyFormat
from lmserve.request import SamplingParams
from lmserve.server.errors import bad_request, unsupported
from lmserve.server.protocol import SamplingFields
from lmserve.server.requests.cost import check_sequence_tokens
from lmserve.server.requests.tools import ToolsPlan


@dataclass(frozen=True)
class ChoicePlan:
    """One choice of a response: one engine request."""

    index: int  # choice index in the response
    request_id: str  # engine request id
    prompt_index: int  # which of the plan's prompts it continues
    params: SamplingParams


@dataclass(frozen=True)
class GenerationPlan:
    """Everything the engine runs for one API request."""

    prompts: list[list[int]]  # prompt token ids, one list per prompt
    choices: list[ChoicePlan]  # in choice index order
    echo_texts: list[str] | None = None  # per prompt: text put before each choice's output
    reply: ReplyFormat | None = None  # chat: how to split replies into reasoning, content, tool calls
    tools: ToolsPlan | None = None  # chat: the tools offered and how the model must use them

    @property
    def want_logprobs(self) -> bool:
        return self.choices[0].params.logprobs is not None


def n_predict_max_tokens(request: SamplingFields) -> int | None:
    """llama.cpp's n_predict as max_tokens: -1 is the rest of the context."""
    if "max_tokens" in request.model_fields_set and request.max_tokens != request.n_predict:
        raise bad_request("max_tokens and n_predict are the same setting and disagree", param="n_predict")
    if request.n_predict == 0:
        raise unsupported("n_predict", "n_predict: 0 (evaluating the prompt only)")
    return None if request.n_predict == -1 else request.n_predict


@dataclass(frozen=True)
class ContextLimit:
    """max_tokens as requested, checked against the room the context leaves after a prompt."""

    max_model_len: int
    requested: int | None  # None: all the remaining context
    param: str  # "max_tokens" or "max_completion_tokens"
    prompt_param: str  # "messages" or "prompt"
    clip: bool = False  # `requested` is a default: at most the room left, never a 400

    def max_tokens_for(self, num_prompt_tokens: int) -> int:
        room = self.max_model_len - num_prompt_tokens
        if room < 1:
            raise bad_request(
                f"This model's maximum context length is {self.max_model_len} tokens. However, your "
                f"request has {num_prompt_tokens} input tokens. Please reduce the length of the input.",
                param=self.prompt_param,
                code="context_length_exceeded",
            )
        if self.requested is None:
            return room
        if self.clip:
            return min(self.requested, room)
        if self.requested > room:
            raise bad_request(
                f"'{self.param}' is too large: {self.requested}. This model's maximum context length is "
                f"{self.max_model_len} tokens and your request has {num_prompt_tokens} input tokens "
                f"({self.requested} > {self.max_model_len} - {num_prompt_tokens}).",
                param=self.param,
                code="context_length_exceeded",
            )
        return self.requested


def choice_plans(
    prompts: list[list[int]], base: SamplingParams, n: int, response_id: str, limit: ContextLimit
) -> list[ChoicePlan]:
    """n choices per prompt; choice index = prompt_index * n + i, as OpenAI numbers them."""
    num_choices = len(prompts) * n
    max_tokens = [limit.max_tokens_for(len(prompt_ids)) for prompt_ids in prompts]
    check_sequence_tokens([count for count in max_tokens for _ in range(n)], limit.param)
    choices = []
    for prompt_index, prompt_ids in enumerate(prompts):
        params = replace(base, max_tokens=max_tokens[prompt_index])
        for i in range(n):
            index = prompt_index * n + i
            request_id = response_id if num_choices == 1 else f"{response_id}-{index}"
            choices.append(ChoicePlan(index, request_id, prompt_index, _seeded(params, index)))
    return choices


def _seeded(params: SamplingParams, index: int) -> SamplingParams:
    # Distinct seeds keep seeded choices reproducible without making them identical.
    if params.seed is None or index == 0:
        return params
    return replace(params, seed=(params.seed + index + 2**63) % 2**64 - 2**63)  # wrap within int64
