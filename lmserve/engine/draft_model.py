"""A draft model: speculative drafts from a smaller (or more quantized) model with the same tokens.

For each sequence that takes drafts (speculation.drafts_for's, while at most
speculation.MAX_RUNNING run; with more, prompt lookup drafts), the draft model decodes a few
tokens greedily after the sequence so far, and the target verifies them in its next step as it verifies prompt-lookup
drafts (runner.py): a draft stands only if it is what the target's own sampling picks, so the
output is what plain decoding gives (token for token under greedy), in fewer target steps where
the two models agree. Greedy drafts depend on the text alone, as prompt-lookup ones do, which is
what keeps sampled requests (--speculative-sampling) distributed as plain sampling's.

The draft model runs as an engine of its own (LLMEngine, no speculation of its own): a proposal
is a request of the sequence's tokens, greedy, `room` tokens out, and every sequence's proposal
runs in the same draft steps. Its prefix cache carries the draft's keys and values from one
proposal to the next, so a proposal computes only what is new since the last: the tokens of the
last, partly filled block, the drafts the target kept and the token it added after them.

The draft model drafts only while it pays here, measured (speculation.Pacer): a few steps with
prompt lookup's drafts instead (the scheduler's own, --speculative-ngram's; none when that is 0), a
few with the draft model's, each timed, and the faster runs until the next measurement. A draft model
as dear as the model itself (the same size), or one the text makes wrong, then costs a few
measured steps rather than every step.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Mapping, Sequence

from lmserve.config import DEFAULT_DRAFT_TOKENS, CacheConfig, DraftConfig, EngineConfig, SchedulerConfig
from lmserve.engine import speculation
from lmserve.request import SamplingParams
from lmserve.weights.load import LoadedModel

log = logging.getLogger("lmserve.engine")


def draft_kv_tokens(kv_tokens: int, max_model_len: int) -> int:
    """The draft engine's KV room: every sequence that may take drafts at full length
    (speculation.MAX_RUNNING), and no more than the model's own cache holds."""
    return min(kv_tokens, speculation.MAX_RUNNING * max_model_len)


def check_same_tokens(draft: LoadedModel, target: LoadedModel) -> None:
    """ValueError unless the draft's token ids mean what the target's do: the same bytes for every
    id both vocabularies have (one may carry padding tokens past the other's end), and logits no
    wider than the target's, so every draft is a token the model can verify. End-of-sequence ids
    need not agree: drafts run past them, and the model alone decides where a sequence ends."""
    mine, theirs = draft.tokenizer, target.tokenizer
    shared = min(mine.vocab_size, theirs.vocab_size)
    differing = next((i for i in range(shared) if mine.token_bytes(i) != theirs.token_bytes(i)), None)
    if differing is not None:
        raise ValueError(f"token {differing} is {mine.token_bytes(differing)!r} to the draft model and "
                         f"{theirs.token_bytes(differing)!r} to the model: a draft model must share its vocabulary")
    if draft.config.vocab_size > target.config.vocab_size:
        raise ValueError(f"the draft model's logits ({draft.config.vocab_size}) are wider than the model's "
                         f"({target.config.vocab_size})")


class DraftModel:
    """Proposes drafts for a target engine's scheduler (Scheduler.proposer)."""

    def __init__(self, engine, num_tokens: int = DEFAULT_DRAFT_TOKENS) -> None:
        self.engine = engine  # an LLMEngine on the draft checkpoint
        self.num_tokens = num_tokens  # drafts per step and sequence (Proposer)
        self.pacer = speculation.Pacer("the draft model's drafts")
        self._names = itertools.count()
        self._asked = False  # the step being scheduled had sequences that could take drafts

    @classmethod
    def for_target(cls, draft: LoadedModel, target: LoadedModel, target_config: EngineConfig, max_model_len: int,
                   kv_tokens: int) -> DraftModel:
        """The draft engine for a target engine of `target_config` whose context is `max_model_len`
        (capped at the draft's own) and whose KV cache holds `kv_tokens` (draft_kv_tokens), in the
        target's KV cache dtype."""
        from lmserve.engine.engine import LLMEngine

        check_same_tokens(draft, target)
        max_len = min(max_model_len, draft.config.max_position_embeddings)
        spec = target_config.draft or DraftConfig("draft")  # a draft handed in directly: the defaults
        config = EngineConfig(
            spec.model_path, "draft", dtype=draft.dtype,
            device=target_config.device,
            cache=CacheConfig(target_config.cache.block_size, kv_cache_tokens=draft_kv_tokens(kv_tokens, max_len),
                              kv_cache_dtype=target_config.cache.kv_cache_dtype),
            # its steps run inside one of the target's, which bounds its own prompts: no bound of its own
            scheduler=SchedulerConfig(speculation.MAX_RUNNING, target_config.scheduler.max_num_batched_tokens, max_len,
                                      max_step_ms=0),
        )
        return cls(LLMEngine(config, draft), spec.tokens)

    def propose(self, wanted: Mapping[str, tuple[Sequence[int], int]]) -> dict[str, list[int]]:
        """Up to `room` greedy tokens after each sequence's `tokens`, by request id: {id: (tokens,
        room)}. A sequence longer than the draft's context gets none; if the draft model fails,
        none get any (logged), and the model decodes on without drafts. None get any either while
        the pacer finds that drafts do not pay."""
        self._asked = True
        if not self.pacer.drafting:
            return {}  # the scheduler drafts by prompt lookup instead
        names: dict[str, str] = {}
        drafts: dict[str, list[int]] = {}
        try:
            for request_id, (tokens, room) in wanted.items():
                name = f"draft-{next(self._names)}"
                try:
                    self.engine.add_request(name, list(tokens), SamplingParams(temperature=0, max_tokens=room,
                                                                                ignore_eos=True))
                except ValueError:
                    continue
                names[name], drafts[request_id] = request_id, []
            while self.engine.has_unfinished:
                for out in self.engine.step().outputs:
                    if out.error is not None:  # the draft model failed this step: no drafts for it
                        drafts[names[out.request_id]] = []
                    else:
                        drafts[names[out.request_id]].extend(out.new_token_ids)
        except Exception:  # noqa: BLE001 - a draft is an optimisation: its failure must not fail requests
            log.exception("the draft model failed; this step runs without drafts")
            for name in names:
                self.engine.abort_request(name)
            drafts = {}
        if not any(drafts.values()):  # none drafted (every sequence past the draft's context, or the
            self._asked = False  # draft model failed): prompt lookup drafts instead, and the step times neither way
            return {}
        return drafts

    def step_started(self) -> None:
        """The model's step begins: it has not asked for drafts yet."""
        self._asked = False

    def step_done(self, num_decodes: int, num_tokens: int, seconds: float, prefill: bool) -> None:
        """The model's step is done: `num_tokens` output tokens of `num_decodes` decoding sequences
        in `seconds`, proposals included; timed for the pacer if drafts could have run in it and no
        prompt chunk shared it."""
        if self._asked and not prefill and num_decodes:
            self.pacer.record(num_tokens / num_decodes, seconds, num_decodes)

    def close(self) -> None:
        self.engine.close("the model was unloaded")
