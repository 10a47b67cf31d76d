"""llama.cpp's own answer shape for POST /completion (and /completions, /infill without /v1).

One object per choice ({content, tokens, stop, stop_type, stopping_word, tokens_cached,
tokens_evaluated, timings, generation_settings, completion_probabilities, ...}); several choices
answer a list. Streaming sends `data: {content, tokens, stop: false, ...}` per step and a last
event with stop true and every field, and no [DONE], as llama.cpp's server does.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from contextlib import aclosing
from typing import TYPE_CHECKING, Any

from lmserve.request import FinishReason, SampleLogprobs, SamplingParams, TokenLogprob
from lmserve.server.requests.plan import ChoicePlan, GenerationPlan
from lmserve.server.responses.choices import ChoiceResult, ResponseMeta, new_results, recorded_outputs, timings
from lmserve.server.responses.logprobs import MIN_LOGPROB

if TYPE_CHECKING:
    from lmserve.engine.async_engine import AsyncEngine
    from lmserve.text.tokenizer import ChatTokenizer


def native_body(meta: ResponseMeta, plan: GenerationPlan, results: dict[int, ChoiceResult],
                tokenizer: ChatTokenizer, settings: NativeSettings) -> dict[str, Any] | list[dict[str, Any]]:
    bodies = [final_object(meta, plan, choice, results[choice.index], tokenizer, settings, stream=False)
              for choice in plan.choices]
    return bodies[0] if len(bodies) == 1 else bodies


@dataclass(frozen=True, kw_only=True)
class NativeSettings:
    """What the request asked of the answer's shape."""

    return_tokens: bool
    timings_per_token: bool
    n_ctx: int  # the model's context, reported in generation_settings
    id_slots: dict[int, int]  # engine request id -> the slot it ran in (-1: none)


def final_object(meta: ResponseMeta, plan: GenerationPlan, choice: ChoicePlan, result: ChoiceResult,
                 tokenizer: ChatTokenizer, settings: NativeSettings, stream: bool) -> dict[str, Any]:
    body = {
        "index": choice.index,
        "content": "" if stream else _echo(plan, choice) + result.text,
        "tokens": [] if stream or not settings.return_tokens else result.token_ids,
        "id_slot": settings.id_slots.get(choice.request_id, -1),
        "stop": True,
        "model": meta.model,
        "tokens_predicted": result.num_tokens,
        "tokens_evaluated": len(plan.prompts[choice.prompt_index]),
        "generation_settings": generation_settings(choice.params, settings.n_ctx, meta.model),
        "prompt": tokenizer.decode(plan.prompts[choice.prompt_index], skip_special_tokens=False),
        "has_new_line": "\n" in result.text,
        "truncated": False,  # a prompt longer than the context is refused, never cut
        "stop_type": stop_type(result),
        "stopping_word": result.stop_string or "",
        "tokens_cached": result.num_cached_tokens,
        "timings": timings(result),
    }
    if not stream and choice.params.logprobs is not None:
        body["completion_probabilities"] = probabilities(tokenizer, result.logprobs, choice.params)
    return body


def _echo(plan: GenerationPlan, choice: ChoicePlan) -> str:
    return plan.echo_texts[choice.prompt_index] if plan.echo_texts else ""


def stop_type(result: ChoiceResult) -> str:
    """llama.cpp's stop_type: eos (an end token), word (a stop string), limit (n_predict or the context)."""
    if result.finish_reason == FinishReason.LENGTH:
        return "limit"
    return "word" if result.stop_string is not None else "eos"


def generation_settings(params: SamplingParams, n_ctx: int, model: str) -> dict[str, Any]:
    """The settings a choice ran with, in llama.cpp's names."""
    chain = params.chain
    return {
        "n_ctx": n_ctx,
        "model": model,
        "seed": -1 if params.seed is None else params.seed,
        "temperature": params.temperature,
        "top_k": params.top_k,
        "top_p": params.top_p,
        "min_p": params.min_p,
        "typical_p": chain.typical_p if chain else 1.0,
        "repeat_last_n": params.repetition_window or -1,
        "repeat_penalty": params.repetition_penalty,
        "presence_penalty": params.presence_penalty,
        "frequency_penalty": params.frequency_penalty,
        "mirostat": chain.mirostat if chain else 0,
        "n_predict": params.max_tokens,
        "max_tokens": params.max_tokens,
        "ignore_eos": params.ignore_eos,
        "n_probs": params.logprobs or 0,
        "min_keep": chain.min_keep if chain else 0,
        "stop": list(params.stop),
        "samplers": list(chain.order) if chain else [],
        "post_sampling_probs": params.post_sampling_probs,
    }


def probabilities(tokenizer: ChatTokenizer, samples: list[SampleLogprobs],
                  params: SamplingParams) -> list[dict[str, Any]]:
    """completion_probabilities: per token its id, text, bytes and logprob (or prob after the
    sampler chain with post_sampling_probs) and the top ones."""
    post = params.post_sampling_probs  # the sampler then reports probabilities after its chain
    value_key, top_key = ("prob", "top_probs") if post else ("logprob", "top_logprobs")
    return [{**_entry(tokenizer, sample.sampled, value_key, post),
             top_key: [_entry(tokenizer, entry, value_key, post) for entry in sample.top]}
            for sample in samples]


def _entry(tokenizer: ChatTokenizer, entry: TokenLogprob, key: str, post: bool) -> dict[str, Any]:
    raw = tokenizer.token_bytes(entry.token_id)
    value = entry.prob if post and entry.prob is not None else max(entry.logprob, MIN_LOGPROB)
    return {"id": entry.token_id, "token": raw.decode("utf-8", errors="replace"), "bytes": list(raw), key: value}


async def native_events(engine: AsyncEngine, plan: GenerationPlan, meta: ResponseMeta,
                        settings: NativeSettings) -> AsyncIterator[str]:
    """A `data:` event per step of each choice, then its final object with stop true."""
    results = new_results(plan)
    choices = {choice.index: choice for choice in plan.choices}
    for choice in plan.choices:
        if plan.echo_texts:
            yield _event({"index": choice.index, "content": _echo(plan, choice), "tokens": [], "stop": False})
    async with aclosing(recorded_outputs(engine, plan, results)) as outputs:
        async for index, output in outputs:
            choice, result = choices[index], results[index]
            if output.new_token_ids or output.text_delta:
                yield _event(_partial(choice, result, output.text_delta, output.new_token_ids, output.new_logprobs,
                                      engine.tokenizer, settings))
            if output.finish_reason is not None:
                yield _event(final_object(meta, plan, choice, result, engine.tokenizer, settings, stream=True))


def _partial(choice: ChoicePlan, result: ChoiceResult, text: str, token_ids: list[int],
             samples: list[SampleLogprobs] | None, tokenizer: ChatTokenizer,
             settings: NativeSettings) -> dict[str, Any]:
    event = {
        "index": choice.index,
        "content": text,
        "tokens": token_ids,
        "stop": False,
        "id_slot": settings.id_slots.get(choice.request_id, -1),
        "tokens_predicted": result.num_tokens,
        "tokens_evaluated": result.num_prompt_tokens,
    }
    if settings.timings_per_token:
        event["timings"] = timings(result)
    if samples and choice.params.logprobs is not None:
        event["completion_probabilities"] = probabilities(tokenizer, samples, choice.params)
    return event


def _event(body: dict[str, Any]) -> str:
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"
