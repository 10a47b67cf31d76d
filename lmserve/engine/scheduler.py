"""Continuous batching by token counts. Pure Python: no torch.

Every step, running requests go first (decodes and unfinished prefill chunks), then waiting
ones join with whatever their cached prefix saves them, all under one token budget, and the
decodes' speculative drafts (speculation.py) take what is left. A step that decodes also bounds
its prompt tokens by time: as many as keep it within config.max_step_ms by the steps' measured
cost (step_cost.py), so that a prompt does not stall the streams decoding beside it. Prefill,
chunked prefill, prefix hits and recompute after preemption are the same path: a request needs
`num_uncomputed_tokens` (request.py) more tokens through the model.

A waiting request whose next prompt block a running request is computing right now waits for
it rather than computing it again: a burst of requests sharing a long system prompt prefills
it once, and the others then find it in the prefix cache.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

from lmserve.cache.block_pool import BlockPool
from lmserve.cache.prefix import hash_full_blocks
from lmserve.config import SchedulerConfig
from lmserve.engine import speculation
from lmserve.engine.batch import ScheduledSeq, SchedulerOutput
from lmserve.engine.step_cost import StepCost, prompt_budget
from lmserve.request import FinishReason, Request, RequestStatus


class Proposer(Protocol):
    """Where drafts come from before prompt lookup (engine/draft_model.py)."""

    num_tokens: int  # drafts per step and sequence (prompt lookup's count is the config's)

    def propose(self, wanted: Mapping[str, tuple[Sequence[int], int]]) -> dict[str, list[int]]:
        """Up to `room` drafts after each sequence's tokens, by request id: {id: (tokens, room)};
        {} for prompt lookup to draft this step instead."""
        ...


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_size: int, pool: BlockPool, proposer: Proposer | None = None,
                 forced: Callable[[Request, int], list[int]] | None = None):
        """`forced(request, n)`: up to n tokens of the text a request's constraint forces next ([] for
        none), asked for constrained requests that may take drafts; they are drafted before any
        other drafts."""
        self.config = config
        self.block_size = block_size
        self.pool = pool
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.drafters: dict[str, speculation.Drafter] = {}  # request id -> its prompt lookup
        self.proposer = proposer  # drafts from a draft model, for all of a step's sequences at once
        self.forced = forced
        self.forced_drafters: dict[str, speculation.Drafter] = {}  # request id -> the tally of its forced drafts
        self.busy_pacer = speculation.Pacer(f"prompt lookup's drafts with more than {speculation.MAX_RUNNING} running",
                                            turn=1, warm=False)  # plain and drafted steps in turn
        self.step_cost = StepCost()  # every step's decode rows, prompt tokens and seconds (step_done)

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        decodes = sum(request.num_uncomputed_tokens == 1 for request in self.running)
        prompt = prompt_budget(self.step_cost.fit(), decodes, self.config.max_step_ms)
        budget = self.config.max_num_batched_tokens
        prompt = budget if prompt is None else prompt  # prompt tokens (all but decodes) the step may take
        budget, prompt = self._schedule_running(out, budget, prompt)
        num_running = len(out.seqs)  # the requests admitted below take no drafts this step
        budget = self._schedule_waiting(out, budget, prompt)
        self._schedule_drafts(out, num_running, budget)
        return out

    def _schedule_running(self, out: SchedulerOutput, budget: int, prompt: int) -> tuple[int, int]:
        """Each running request's tokens in turn within `budget`, a prefill chunk's within `prompt`
        too: (budget, prompt) left."""
        index = 0
        while index < len(self.running) and budget > 0:
            request = self.running[index]
            remaining = request.num_uncomputed_tokens
            count = min(remaining, budget) if remaining == 1 else min(remaining, budget, prompt)
            out.prompt_bounded |= remaining > 1 and prompt < min(remaining, budget)
            if count == 0:  # a prefill chunk past the prompt bound: next step
                index += 1
                continue
            while not self._grow(request, count):
                victim = self.running.pop()  # the newest request makes room
                self._preempt(victim)
                out.num_preempted += 1
                if victim is request:
                    break
            else:
                out.seqs.append(ScheduledSeq(request, count))
                budget -= count
                prompt -= count if remaining > 1 else 0
                index += 1
        return budget, prompt

    def _schedule_drafts(self, out: SchedulerOutput, num_running: int, budget: int) -> None:
        """Drafts for the decodes of the step's first `num_running` sequences (those running before
        it), out of the budget and blocks that every running request's own tokens and the prompts
        admitted leave: they never keep a request from its token, hold back a prompt or cost anyone
        a preemption. With more than speculation.MAX_RUNNING running, a step that computes prompt
        tokens runs none (its drafters only tally their last proposals): it is bound by compute, so
        its draft rows cost about what they could save and make it longer, and the prompt's first
        token later (bench/RESULTS.md, "Drafts leave steps that compute a prompt alone"). A step of
        decodes alone runs them while busy_pacer finds that they pay, and is timed for it
        (out.paced) when some request could take them; while the pacer times steps without them,
        proposals are still made and tallied (a lookup's cost, measured on the plain side)."""
        if not (self.config.num_speculative_tokens or (self.proposer is not None and self.proposer.num_tokens)):
            return  # speculation off
        decoding = [position for position in range(num_running) if out.seqs[position].num_new_tokens == 1]
        rooms = {out.seqs[position].request.request_id: self._room(out.seqs[position].request) for position in decoding}
        threshold = speculation.worth(len(self.running))
        if len(self.running) > speculation.MAX_RUNNING:
            if not all(seq.runs_as_decode_rows for seq in out.seqs):
                budget = 0
            elif budget > 0 and self.config.num_speculative_tokens and any(
                    room is not None and room > 0 for room in rooms.values()):
                out.paced = True
                if self.busy_pacer.probing:
                    threshold = math.inf  # proposals made and tallied, none run: rates stay current through the timing
                elif not self.busy_pacer.drafting:
                    budget = 0  # no proposals (drafters still index the new tokens)
        proposals = self._proposals([out.seqs[position].request for position in decoding], rooms, budget)
        for position in decoding:
            request = out.seqs[position].request
            draft = self._draft(request, rooms[request.request_id], budget, proposals, threshold)
            if draft and self._grow(request, 1 + len(draft)):
                out.seqs[position] = ScheduledSeq(request, 1 + len(draft), draft)
                budget -= len(draft)

    def step_done(self, out: SchedulerOutput, num_tokens: int, seconds: float) -> None:
        """`out` ran, giving `num_tokens` output tokens in `seconds`: timed for the step cost, and
        for busy_pacer if paced."""
        decode_rows = sum(seq.num_new_tokens for seq in out.seqs if seq.runs_as_decode_rows)
        self.step_cost.record(decode_rows, out.num_tokens - decode_rows, seconds)
        if out.paced:
            self.busy_pacer.record(num_tokens / len(out.seqs), seconds, len(out.seqs))

    def _draft(self, request: Request, room: int | None, budget: int, proposals: Mapping[str, list[int]],
               threshold: float) -> list[int]:
        """Drafts for a decoding request with `room` (_room), within the budget: the text its
        constraint forces, or the proposer's, or prompt lookup's; [] when speculation is off or
        does not apply (speculation.py)."""
        forced = self._forced_drafts(request, room, budget, threshold)
        if forced is not None:
            return forced
        if proposals:  # the draft model ran this step; when it does not, prompt lookup drafts
            if room is None or not self.proposer.num_tokens:
                return []
            return proposals.get(request.request_id, [])[:max(min(room, self.proposer.num_tokens, budget), 0)]
        if room is None or not self.config.num_speculative_tokens:
            return []
        drafter = self.drafters.setdefault(request.request_id, speculation.Drafter())
        wanted = min(room, self.config.num_speculative_tokens, budget)
        return drafter.drafts(request.all_ids, wanted, threshold)  # called at no room too: it tallies its last proposal

    def _forced_drafts(self, request: Request, room: int | None, budget: int, threshold: float) -> list[int] | None:
        """Drafts of the text `request`'s constraint forces next (a JSON schema's keys and the
        punctuation around them: speculation.py), judged by their own tally; None where it forces
        nothing now, or no drafts may run, and other drafts apply."""
        if (self.forced is None or request.params.grammar is None or room is None
                or not self.config.num_speculative_tokens or threshold == math.inf):
            return None
        wanted = min(room, self.config.num_speculative_tokens, budget)
        proposal = self.forced(request, wanted) if wanted > 0 else []
        if not proposal:
            return None
        rid = request.request_id
        self.drafters.setdefault(rid, speculation.Drafter()).drafts(request.all_ids, 0)  # indexes, tallies; no proposal
        drafter = self.forced_drafters.setdefault(rid, speculation.Drafter(kept=speculation.FORCED_PRIOR))
        return drafter.judge(request.all_ids, proposal, threshold)

    def _room(self, request: Request) -> int | None:
        """The drafts `request` may take this step within its max_tokens and the context, the
        drafts per step and the budget aside; None where its sampling takes no drafts
        (speculation.drafts_for). Asked once per decoding request a step."""
        if not speculation.drafts_for(request.params, self.config.speculative_sampling):
            return None
        return min(request.params.max_tokens - len(request.output_ids) - 1,
                   self.config.max_model_len - request.num_tokens - 1)

    def _proposals(self, decoding: Sequence[Request], rooms: Mapping[str, int | None],
                   budget: int) -> dict[str, list[int]]:
        """The proposer's drafts for the `decoding` requests that have room (`rooms`, by request
        id), asked for together (one batch of draft steps), each at most `budget`; {} without a
        proposer or budget, and while more than speculation.MAX_RUNNING run (its cache holds that
        many; prompt lookup drafts then)."""
        if self.proposer is None or budget <= 0 or len(self.running) > speculation.MAX_RUNNING:
            return {}
        wanted = {}
        for request in decoding:
            room = rooms[request.request_id]
            if room is not None and self.proposer.num_tokens and room > 0:
                wanted[request.request_id] = (request.all_ids, min(room, self.proposer.num_tokens, budget))
        return self.proposer.propose(wanted) if wanted else {}

    def _schedule_waiting(self, out: SchedulerOutput, budget: int, prompt: int) -> int:
        """Waiting requests join while `budget`, `prompt` (their tokens' own bound) and the
        sequences allow: the budget left."""
        in_flight: set | None = None  # hashes of the prompt blocks running requests are computing
        index = 0
        while (index < len(self.waiting) and min(budget, prompt) > 0
               and len(self.running) < self.config.max_num_seqs):
            request = self.waiting[index]
            if not request.block_ids:
                self._take_cached_prefix(request)
            if in_flight is None:
                in_flight = {h for running in self.running for h in _unregistered_hashes(running)}
            if self._next_block_hash(request) in in_flight:
                self._drop_blocks(request)  # it waits for them to be cached; the lookup is redone then
                index += 1
                continue
            remaining = request.num_uncomputed_tokens
            count = min(remaining, budget, prompt)
            out.prompt_bounded |= prompt < min(remaining, budget)
            if not self._grow(request, count):
                self._drop_blocks(request)  # hold nothing while waiting; the lookup is redone next time
                break  # waiting requests never preempt running ones
            del self.waiting[index]
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            out.seqs.append(ScheduledSeq(request, count))
            in_flight.update(_unregistered_hashes(request))
            budget -= count
            prompt -= count
        out.prompt_bounded |= (prompt <= 0 < budget and index < len(self.waiting)
                               and len(self.running) < self.config.max_num_seqs)  # one left waiting for it
        return budget

    def _next_block_hash(self, request: Request):
        """The hash of the first prompt block `request` would compute that the prefix cache could
        have given it; None if it reads no cache or has no such block left."""
        usable = (len(request.all_ids) - 1) // self.block_size if request.params.read_prefix_cache else 0
        index = request.num_computed_tokens // self.block_size
        return request.block_hashes[index] if index < usable else None

    def _take_cached_prefix(self, request: Request) -> None:
        # At least one token must run through the model to produce logits.
        ids = request.all_ids
        request.block_hashes = hash_full_blocks(ids, self.block_size, request.block_hashes)
        usable = (len(ids) - 1) // self.block_size if request.params.read_prefix_cache else 0
        request.block_ids = self.pool.lookup(request.block_hashes[:usable])
        request.num_computed_tokens = len(request.block_ids) * self.block_size
        request.num_registered_blocks = len(request.block_ids)
        if request.num_preemptions == 0:
            request.num_cached_prompt_tokens = request.num_computed_tokens

    def _grow(self, request: Request, count: int) -> bool:
        """Give `request` blocks for `count` more tokens; False if the pool is short."""
        needed = math.ceil((request.num_computed_tokens + count) / self.block_size) - len(request.block_ids)
        if needed <= 0:
            return True
        # The most tokens it can hold: its last token's keys and values are never computed.
        most = min(len(request.prompt_ids) + request.params.max_tokens, self.config.max_model_len) - 1
        room = math.ceil(most / self.block_size) - len(request.block_ids) - needed  # blocks it may still grow into
        blocks = self.pool.allocate(needed, request.request_id, room)
        if blocks is None:
            return False
        request.block_ids.extend(blocks)
        return True

    def _drop_blocks(self, request: Request) -> None:
        self.pool.release(request.block_ids, request.request_id)
        request.block_ids = []
        request.num_computed_tokens = 0
        request.num_registered_blocks = 0

    def _preempt(self, request: Request) -> None:
        self._drop_blocks(request)
        request.num_preemptions += 1
        request.status = RequestStatus.PREEMPTED
        self.waiting.appendleft(request)

    def update(self, out: SchedulerOutput, sampled: dict[str, int],
               accepted: dict[str, list[int]] | None = None) -> list[Request]:
        """Advance scheduled requests by the tokens they ran and append the sampled ones: `sampled`
        the token after each request's last known one, `accepted` the tokens its kept drafts add
        after it (the pick after each kept draft), each kept draft's keys and values then
        counting as computed. Stops at the first token that ends a request. Returns the requests
        that finished by length or stop token in this step."""
        finished = []
        for seq in out.seqs:
            request = seq.request
            if request.is_finished:
                continue  # aborted while the step ran
            request.num_computed_tokens += seq.num_new_tokens - len(seq.draft)
            token = sampled.get(request.request_id)
            if token is None:
                self._register_full_blocks(request)
                continue
            tokens = [token, *(accepted or {}).get(request.request_id, ())]
            reason = None
            for index, token in enumerate(tokens):
                request.append_output(token)
                if index < len(tokens) - 1:
                    request.num_computed_tokens += 1  # an accepted draft: its keys and values are this token's
                reason = self._stop_reason(request, token)
                if reason is not None:
                    break
            self._register_full_blocks(request)
            if reason is not None:
                self.finish(request, reason)
                finished.append(request)
        return finished

    def _register_full_blocks(self, request: Request) -> None:
        num_full = request.num_computed_tokens // self.block_size
        if num_full <= request.num_registered_blocks:
            return
        if len(request.block_hashes) < num_full:  # the prompt's were hashed at its lookup: kept, so
            # the blocks still being computed stay known (see _schedule_waiting)
            request.block_hashes = hash_full_blocks(request.all_ids[: num_full * self.block_size],
                                                    self.block_size, request.block_hashes)
        for index in range(request.num_registered_blocks, num_full):
            self.pool.register(request.block_ids[index], request.block_hashes[index])
        request.num_registered_blocks = num_full

    def _stop_reason(self, request: Request, token: int) -> FinishReason | None:
        params = request.params
        if token in params.stop_token_ids or (not params.ignore_eos and token in request.eos_token_ids):
            return FinishReason.STOP
        if len(request.output_ids) >= params.max_tokens or request.num_tokens >= self.config.max_model_len:
            return FinishReason.LENGTH
        return None

    def finish(self, request: Request, reason: FinishReason) -> None:
        """Finish a request wherever it is and free its blocks. Idempotent."""
        if request.is_finished:
            return
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        self.pool.release(request.block_ids, request.request_id)
        self.drafters.pop(request.request_id, None)
        self.forced_drafters.pop(request.request_id, None)
        request.block_ids = []
        request.status = RequestStatus.FINISHED
        request.finish_reason = reason


def _unregistered_hashes(request: Request) -> list:
    """Hashes of `request`'s full prompt blocks not yet in the prefix cache (being computed)."""
    return request.block_hashes[request.num_registered_blocks:]
