"""A draft model: speculative drafts from a smaller (or more quantized) model with the same tokens.

For each sequence that takes drafts (the ones prompt lookup serves: speculation.drafts_for, while
at most speculation.MAX_RUNNING run), the draft model decodes a few tokens greedily after the
sequence so far, and the target verifies them in its next step as it verifies prompt-lookup
drafts (runner.py): a draft stands only if it is what the target's own sampling picks, so the
output is what plain decoding gives (token for token under greedy), in fewer target steps where
the two models agree. Greedy drafts depend on the text alone, as prompt-lookup ones do, which is
what keeps sampled requests (--speculative-sampling) distributed as plain sampling's.

The draft model runs as an engine of its own (LLMEngine, no speculation of its own): a proposal
is a request of the sequence's tokens, greedy, `room` tokens out, and every sequence's proposal
runs in the same draft steps. Its prefix cache carries the draft's keys and values from one
proposal to the next, so a proposal computes only what is new since the last: the tokens of the
last, partly filled block, the drafts the target kept and the token it added after them.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from lmserve.config import CacheConfig, EngineConfig, SchedulerConfig
from lmserve.engine import speculation
from lmserve.request import SamplingParams
from lmserve.weights.load import LoadedModel


def check_same_tokens(draft: LoadedModel, target: LoadedModel) -> None:
    """ValueError unless the draft's token ids mean what the target's do: the same vocabulary,
    token for token, the same end-of-sequence ids, and logits no wider than the target's."""
    mine, theirs = draft.tokenizer, target.tokenizer
    if mine.vocab_size != theirs.vocab_size:
        raise ValueError(f"the draft model has {mine.vocab_size} tokens and the model {theirs.vocab_size}: "
                         "a draft model must share the model's vocabulary")
    differing = next((i for i in range(mine.vocab_size) if mine.token_bytes(i) != theirs.token_bytes(i)), None)
    if differing is not None:
        raise ValueError(f"token {differing} is {mine.token_bytes(differing)!r} to the draft model and "
                         f"{theirs.token_bytes(differing)!r} to the model: a draft model must share its vocabulary")
    if set(mine.eos_token_ids) != set(theirs.eos_token_ids):
        raise ValueError("the draft model ends sequences on other tokens than the model")
    if draft.config.vocab_size > target.config.vocab_size:
        raise ValueError(f"the draft model's logits ({draft.config.vocab_size}) are wider than the model's "
                         f"({target.config.vocab_size})")


class DraftModel:
    """Proposes drafts for a target engine's scheduler (Scheduler.proposer)."""

    def __init__(self, engine) -> None:
        self.engine = engine  # an LLMEngine on the draft checkpoint
        self._names = itertools.count()

    @classmethod
    def for_target(cls, draft: LoadedModel, target: LoadedModel, target_config: EngineConfig, max_model_len: int,
                   kv_tokens: int) -> DraftModel:
        """The draft engine for a target engine of `target_config` whose context is `max_model_len`
        (capped at the draft's own) and whose KV cache holds `kv_tokens`: the draft's holds as many
        (its memory is committed only as blocks are first written)."""
        from lmserve.engine.engine import LLMEngine

        check_same_tokens(draft, target)
        config = EngineConfig(
            target_config.draft.model_path if target_config.draft else "draft", "draft", dtype=draft.dtype,
            device=target_config.device,
            cache=CacheConfig(target_config.cache.block_size, kv_cache_tokens=kv_tokens),
            scheduler=SchedulerConfig(speculation.MAX_RUNNING, target_config.scheduler.max_num_batched_tokens,
                                      min(max_model_len, draft.config.max_position_embeddings)),
        )
        return cls(LLMEngine(config, draft))

    def propose(self, wanted: Mapping[str, tuple[Sequence[int], int]]) -> dict[str, list[int]]:
        """Up to `room` greedy tokens after each sequence's `tokens`, by request id: {id: (tokens,
        room)}. A sequence longer than the draft's context gets none."""
        names = {}
        for request_id, (tokens, room) in wanted.items():
            name = f"draft-{next(self._names)}"
            try:
                self.engine.add_request(name, list(tokens), SamplingParams(temperature=0, max_tokens=room,
                                                                            ignore_eos=True))
            except ValueError:
                continue
            names[name] = request_id
        drafts: dict[str, list[int]] = {request_id: [] for request_id in names.values()}
        while self.engine.has_unfinished:
            for out in self.engine.step().outputs:
                if out.error is not None:  # the draft model failed this step: no drafts for it
                    drafts[names[out.request_id]] = []
                else:
                    drafts[names[out.request_id]].extend(out.new_token_ids)
        return drafts

    def close(self) -> None:
        self.engine.close("the model was unloaded")
