"""The only place that builds tensors: one step's inputs, the model call, sampling."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch

from lmserve.engine.batch import LiveRequest, ScheduledSeq, SchedulerOutput
from lmserve.model.attention import AttentionMetadata, PrefillSeq
from lmserve.request import SampleLogprobs
from lmserve.sampling.grammar import GrammarMask
from lmserve.sampling.sampler import Sampler, SamplingMetadata, to_sample_logprobs

log = logging.getLogger("lmserve.engine")


@dataclass
class ModelInput:
    input_ids: torch.Tensor  # (num_tokens,)
    positions: torch.Tensor  # (num_tokens,)
    meta: AttentionMetadata
    logits_indices: torch.Tensor  # (num_sampled + num_drafts,) rows to sample from, then the drafts' rows
    sampled_seqs: list[ScheduledSeq]


@dataclass
class StepResult:
    token_ids: dict[str, int]
    logprobs: dict[str, SampleLogprobs]
    errors: dict[str, str] = field(default_factory=dict)  # request id -> why it failed this step
    grammar_finished: set[str] = field(default_factory=set)  # grammar complete: nothing more may follow
    unsatisfiable: dict[str, str] = field(default_factory=dict)  # request id -> why its grammar allows no token
    accepted: dict[str, list[int]] = field(default_factory=dict)  # request id -> tokens after token_ids' its drafts gave
    num_draft_tokens: int = 0  # drafts verified this step
    num_accepted_tokens: int = 0  # of those, drafts kept

    def merge(self, other: StepResult) -> None:
        self.token_ids.update(other.token_ids)
        self.logprobs.update(other.logprobs)
        self.errors.update(other.errors)
        self.grammar_finished |= other.grammar_finished
        self.unsatisfiable.update(other.unsatisfiable)


class ModelRunner:
    """Builds a step's tensors, runs the model and samples. Holds no per-request state: a request's
    generator, grammar matcher and Mirostat mu come with it, in the engine's LiveRequest records."""

    def __init__(self, model: torch.nn.Module, kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
                 block_size: int, device: torch.device):
        self.model = model
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.device = device
        self.sampler = Sampler()

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput, live: Mapping[str, LiveRequest]) -> StepResult:
        inp = self.prepare(out)
        hidden = self.model(inp.input_ids, inp.positions, self.kv_caches, inp.meta)
        if not inp.sampled_seqs:
            return StepResult({}, {})
        logits = self.model.compute_logits(hidden[inp.logits_indices])  # (num_sampled + num_drafts, vocab)
        num_sampled = len(inp.sampled_seqs)
        step = self._sample(logits[:num_sampled], [live[seq.request.request_id] for seq in inp.sampled_seqs])
        if num_sampled < logits.shape[0]:
            self._verify_drafts(logits[num_sampled:], inp.sampled_seqs, live, step)
        return step

    def _verify_drafts(self, logits: torch.Tensor, seqs: list[ScheduledSeq], live: Mapping[str, LiveRequest],
                       step: StepResult) -> None:
        """Keep each sequence's drafts while they are what its sampling picks: draft i stands if the
        token picked before it (the step's own, then the picks at the drafts' rows) equals it; the
        pick after the last standing draft follows it. `logits` holds the drafts' rows in order.

        Each draft row is sampled as the sequence's next step would be, with fresh random numbers:
        a kept token was drawn from exactly the distribution plain decoding draws it from, given
        the same tokens before it, so the output is distributed as plain decoding's (exactly
        greedy decoding's for greedy requests), and a draft stands with the probability its
        sampling gives it. Under a grammar, each draft row is masked as that step would be, by the
        grammar after the tokens before it, and the kept tokens advance the request's matcher."""
        params = [seq.request.params for seq in seqs for _ in seq.draft]
        meta = SamplingMetadata(params=params, prompt_ids=[[]] * len(params), output_ids=[[]] * len(params),
                                generators=[None] * len(params),
                                grammar_mask=self._draft_masks(seqs, live, step, logits.shape[1]))
        picked = self.sampler(logits, meta).token_ids.tolist()
        row = 0
        for seq in seqs:
            if not seq.draft:
                continue
            rid = seq.request.request_id
            picks = picked[row:row + len(seq.draft)]  # the token after each draft
            row += len(seq.draft)
            step.num_draft_tokens += len(seq.draft)
            if rid in step.errors or rid not in step.token_ids:
                continue
            previous, kept = step.token_ids[rid], []
            for draft, pick in zip(seq.draft, picks):
                if previous != draft:
                    break
                kept.append(pick)
                previous = pick
            if live[rid].matcher is not None:
                kept = self._advance_kept(live[rid].matcher, rid, kept, step)
            step.num_accepted_tokens += len(kept)
            if kept:
                step.accepted[rid] = kept

    @staticmethod
    def _draft_masks(seqs: list[ScheduledSeq], live: Mapping[str, LiveRequest], step: StepResult,
                     vocab_size: int) -> GrammarMask | None:
        """The grammar masks of the draft rows of constrained sequences whose first draft stood:
        the row after draft i is masked by the grammar after the step's token and drafts 1..i (a
        fork of the request's matcher walks them); the rows after a draft the grammar refuses stay
        open, as that draft cannot stand."""
        states, row = {}, 0
        for seq in seqs:
            rid, matcher = seq.request.request_id, live[seq.request.request_id].matcher
            if (seq.draft and matcher is not None and step.token_ids.get(rid) == seq.draft[0]
                    and rid not in step.errors and rid not in step.grammar_finished):
                state = matcher  # after the step's own token, which _sample fed it
                states[row] = state
                for index, draft in enumerate(seq.draft[1:], start=1):
                    state = state.fork()
                    if not state.accept_token(draft) or state.is_terminated():
                        break
                    states[row + index] = state
            row += len(seq.draft)
        if not states:
            return None
        mask = GrammarMask.fill(states, row, vocab_size)
        mask.dead_rows()  # opened: a dead state's drafts cannot stand, and sampling needs no NaN
        return mask

    @staticmethod
    def _advance_kept(matcher, request_id: str, kept: list[int], step: StepResult) -> list[int]:
        """Feed the kept tokens to the request's grammar; those it takes, up to where it ends."""
        if request_id in step.grammar_finished:  # the step's own token ended it
            return []
        for index, token in enumerate(kept):
            if not matcher.accept_token(token):  # cannot happen: each was picked under its mask
                return kept[:index]
            if matcher.is_terminated():
                step.grammar_finished.add(request_id)
                return kept[:index + 1]
        return kept

    def prepare(self, out: SchedulerOutput) -> ModelInput:
        # Decode rows first (batched attention over the paged cache), then prefill chunks. A decode
        # with drafts (speculation.py) runs as that many decode rows, each attending to the context
        # up to itself (its keys and values are in the cache before attention runs): a few rows cost
        # about what one decode does, where a prefill chunk over the context costs twice that. A
        # prompt's chunks keep the prefill path, so a prompt's tail after a prefix-cache hit is
        # computed as the whole prompt was.
        decodes = [s for s in out.seqs if s.runs_as_decode_rows]
        prefills = [s for s in out.seqs if not s.runs_as_decode_rows]
        ids, positions, slots, logits_rows, sampled = [], [], [], [], []
        prefill_meta, rows = [], []  # rows: (block ids, context length) of each decode row
        draft_rows = []  # the hidden rows of the drafts: their logits verify them
        for seq in decodes + prefills:
            req, start = seq.request, seq.num_computed_tokens
            end = start + seq.num_new_tokens
            if seq.runs_as_decode_rows:
                rows.extend((req.block_ids, position + 1) for position in range(start, end))
            else:
                prefill_meta.append(PrefillSeq(len(ids), seq.num_new_tokens, end,
                                               self._slots(req.block_ids, end) if start else None))
            ids.extend(req.all_ids[start:end - len(seq.draft)])
            ids.extend(seq.draft)
            positions.extend(range(start, end))
            slots.extend(self._slot(req.block_ids, p) for p in range(start, end))
            if seq.samples:
                logits_rows.append(len(ids) - 1 - len(seq.draft))
                sampled.append(seq)
                draft_rows.extend(range(len(ids) - len(seq.draft), len(ids)))
        lens = self._long([length for _, length in rows]) if rows else None
        meta = AttentionMetadata(slot_mapping=self._long(slots), num_decodes=len(rows),
                                 decode_blocks=self._decode_table(rows), decode_lens=lens, prefills=prefill_meta,
                                 block_size=self.block_size)
        return ModelInput(input_ids=self._long(ids), positions=self._long(positions), meta=meta,
                          logits_indices=self._long(logits_rows + draft_rows), sampled_seqs=sampled)

    def read_blocks(self, block_ids: list[int]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Copies of the blocks' keys and values, layer by layer, each
        (num_kv_heads, len(block_ids), block_size, head_dim) in the cache's dtype."""
        index = self._long(block_ids)
        for keys, values in self.kv_caches:
            yield self._by_block(keys).index_select(1, index), self._by_block(values).index_select(1, index)

    def write_blocks(self, layer: int, block_ids: list[int], keys: torch.Tensor, values: torch.Tensor) -> None:
        """Put one layer's keys and values, shaped as read_blocks yields them, into its blocks."""
        index = self._long(block_ids)
        for cache, data in zip(self.kv_caches[layer], (keys, values)):
            self._by_block(cache).index_copy_(1, index, data.to(cache.device, cache.dtype))

    def _by_block(self, cache: torch.Tensor) -> torch.Tensor:
        num_kv_heads, num_slots, head_dim = cache.shape
        return cache.view(num_kv_heads, num_slots // self.block_size, self.block_size, head_dim)  # (Hkv, B, bs, D)

    def _long(self, values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=self.device)

    def _slot(self, block_ids: list[int], position: int) -> int:
        return block_ids[position // self.block_size] * self.block_size + position % self.block_size

    def _slots(self, block_ids: list[int], length: int) -> torch.Tensor:
        """Cache slots of positions [0, length), for attention over earlier context."""
        blocks = self._long(block_ids)
        offsets = torch.arange(self.block_size, device=self.device)
        return (blocks[:, None] * self.block_size + offsets).flatten()[:length]  # (length,)

    def _decode_table(self, rows: list[tuple[list[int], int]]) -> torch.Tensor | None:
        """Block table of the decode rows, each (block ids, context length), padded with block 0
        (attention reads no further than each row's length)."""
        if not rows:
            return None
        table = np.zeros((len(rows), max(len(block_ids) for block_ids, _ in rows)), dtype=np.int64)
        for row, (block_ids, _) in enumerate(rows):
            table[row, : len(block_ids)] = block_ids
        return torch.from_numpy(table).to(self.device)  # (S, B)

    def _sample(self, logits: torch.Tensor, rows: list[LiveRequest]) -> StepResult:
        """Sample the whole batch; if that raises, sample row by row so only the rows that
        cannot be sampled fail (a seeded row then draws from a generator the failed try may
        have advanced)."""
        try:
            return self._sample_batch(logits, rows)
        except Exception:
            if len(rows) == 1:
                raise
            log.exception("sampling the batch failed; sampling its %d rows one by one", len(rows))
        step = StepResult({}, {})
        for index, row in enumerate(rows):
            try:
                step.merge(self._sample_batch(logits[index : index + 1], [row]))
            except Exception as exc:  # noqa: BLE001 - this request fails, the others go on
                step.errors[row.request.request_id] = f"sampling failed: {type(exc).__name__}: {exc}"
        return step

    def _sample_batch(self, logits: torch.Tensor, rows: list[LiveRequest]) -> StepResult:
        requests = [row.request for row in rows]
        matchers = {index: row.matcher for index, row in enumerate(rows) if row.matcher is not None}
        grammar_mask = GrammarMask.fill(matchers, len(requests), logits.shape[1]) if matchers else None
        dead = grammar_mask.dead_rows() if grammar_mask is not None else []
        meta = SamplingMetadata(
            params=[r.params for r in requests],
            prompt_ids=[r.prompt_ids for r in requests],
            output_ids=[r.output_ids for r in requests],
            generators=[row.generator for row in rows],
            grammar_mask=grammar_mask,
            eos_token_ids=[r.eos_token_ids for r in requests],
            mirostat_mu=[row.mirostat_mu for row in rows],
            logit_bias=[row.logit_bias for row in rows],
        )
        result = self.sampler(logits, meta)
        token_ids = result.token_ids.tolist()  # the step's one host sync
        if result.mirostat_mu is not None:  # Mirostat's state lives with the request
            for row, mu in zip(rows, result.mirostat_mu):
                row.mirostat_mu = mu
        logprobs = to_sample_logprobs(result, meta.params)
        ids = [r.request_id for r in requests]
        step = StepResult(dict(zip(ids, token_ids)), {rid: lp for rid, lp in zip(ids, logprobs) if lp is not None})
        for index in dead:
            num_output = len(requests[index].output_ids)
            step.unsatisfiable[ids[index]] = (f"the output constraint allows no token after {num_output} tokens "
                                              "of output: no output can satisfy it")
        for index, matcher in matchers.items():
            if index not in dead:
                self._advance(matcher, ids[index], token_ids[index], step)
        return step

    @staticmethod
    def _advance(matcher, request_id: str, token_id: int, step: StepResult) -> None:
        """Feed the sampled token to the request's grammar; the mask should make this always succeed."""
        if not matcher.accept_token(token_id):
            step.errors[request_id] = f"token {token_id} was sampled outside the grammar"
        elif matcher.is_terminated():
            step.grammar_finished.add(request_id)
