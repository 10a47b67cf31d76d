from dataclasses import replace

import pytest

from lmserve.cache.block_pool import BlockPool
from lmserve.config import SchedulerConfig
from lmserve.engine.scheduler import Scheduler
from lmserve.engine.speculation import Drafter
from lmserve.request import FinishReason, GrammarSpec, Request, RequestStatus, SamplingParams
from tests.helpers.pacing import AlwaysDraft, Recorder


def make(num_blocks=16, block_size=4, budget=8, max_seqs=4, max_len=64):
    pool = BlockPool(num_blocks)
    return Scheduler(SchedulerConfig(max_seqs, budget, max_len), block_size, pool), pool


def req(rid, n_prompt, max_tokens=8, first=100, **kw):
    return Request(rid, list(range(first, first + n_prompt)), SamplingParams(max_tokens=max_tokens, **kw),
                   eos_token_ids=frozenset({2}))


def step(sched, token=7):
    out = sched.schedule()
    sampled = {s.request.request_id: token for s in out.seqs if s.samples}
    finished = sched.update(out, sampled)
    return out, finished


def test_long_prompt_is_chunked_under_the_token_budget():
    sched, _ = make(budget=8)
    r = req("a", 20)
    sched.add(r)
    sizes = []
    for _ in range(3):
        out, _ = step(sched)
        sizes.append([(s.request.request_id, s.num_new_tokens, s.samples) for s in out.seqs])
    assert sizes == [[("a", 8, False)], [("a", 8, False)], [("a", 4, True)]]
    assert r.output_ids == [7] and r.num_computed_tokens == 20


def test_running_decodes_go_before_waiting_prefill():
    sched, _ = make(budget=8)
    a, b = req("a", 3), req("b", 30)
    sched.add(a)
    step(sched)
    sched.add(b)
    out, _ = step(sched)
    assert [(s.request.request_id, s.num_new_tokens) for s in out.seqs] == [("a", 1), ("b", 7)]


def test_finishes_on_eos_max_tokens_and_stop_ids_and_frees_blocks():
    sched, pool = make(budget=64)
    a, b, c = req("a", 3, max_tokens=2), req("b", 3), req("c", 3, stop_token_ids=(7,))
    for r in (a, b, c):
        sched.add(r)
    _, finished = step(sched, token=7)
    assert [r.request_id for r in finished] == ["c"]
    out = sched.schedule()
    finished = sched.update(out, {"a": 5, "b": 2})
    assert {r.request_id: r.finish_reason for r in finished} == {"a": FinishReason.LENGTH, "b": FinishReason.STOP}
    assert pool.num_free == pool.num_blocks and not (sched.waiting or sched.running)


def test_ignore_eos_keeps_going():
    sched, _ = make()
    a = req("a", 3, max_tokens=3, ignore_eos=True)
    sched.add(a)
    for _ in range(3):
        step(sched, token=2)
    assert a.output_ids == [2, 2, 2] and a.finish_reason == FinishReason.LENGTH


def test_context_length_stops_generation():
    sched, _ = make(max_len=6)
    a = req("a", 4, max_tokens=100)
    sched.add(a)
    step(sched)
    step(sched)
    assert a.finish_reason == FinishReason.LENGTH and a.num_tokens == 6


def test_preemption_frees_newest_and_recomputes_it_later():
    sched, pool = make(num_blocks=4, block_size=4, budget=64)
    a, b = req("a", 7, max_tokens=9), req("b", 7, max_tokens=9, first=200)  # 16 tokens: a alone fits
    sched.add(a)
    sched.add(b)
    step(sched)  # both prefilled: 2 blocks each, pool exhausted
    step(sched)  # position 7 still fits in block 2
    assert pool.num_free == 0
    out, _ = step(sched)  # a needs a 3rd block for position 8: b, the newest, is preempted
    assert out.num_preempted == 1 and b.status == RequestStatus.PREEMPTED and b.block_ids == []
    assert [s.request.request_id for s in out.seqs] == ["a"]
    assert b.output_ids == [7, 7] and b.num_computed_tokens == 0
    while a.status != RequestStatus.FINISHED:
        step(sched)
    out, _ = step(sched)  # b comes back and recomputes prompt + its generated token
    assert out.seqs[0].request is b and out.seqs[0].num_new_tokens == 9 and out.seqs[0].samples


def test_prefix_cache_hit_skips_cached_blocks():
    sched, pool = make(budget=64)
    a = req("a", 13, max_tokens=1)
    sched.add(a)
    step(sched)
    assert a.is_finished
    b = req("b", 13, max_tokens=1)
    sched.add(b)
    out, _ = step(sched)
    assert out.seqs[0].num_new_tokens == 1  # 12 of 13 prompt tokens came from the cache
    assert b.num_cached_prompt_tokens == 12


def test_fully_cached_prompt_still_runs_its_last_block():
    sched, _ = make(budget=64)
    a = req("a", 8, max_tokens=1)
    sched.add(a)
    step(sched)
    b = req("b", 8, max_tokens=1)
    sched.add(b)
    out, _ = step(sched)
    assert out.seqs[0].num_new_tokens == 4 and b.num_cached_prompt_tokens == 4


def test_max_num_seqs_limits_running():
    sched, _ = make(max_seqs=2, budget=64)
    for i in range(3):
        sched.add(req(str(i), 3))
    out, _ = step(sched)
    assert len(out.seqs) == 2 and len(sched.waiting) == 1


def test_finish_of_waiting_request_removes_it():
    sched, _ = make()
    a = req("a", 3)
    sched.add(a)
    sched.finish(a, FinishReason.ABORT)
    assert not (sched.waiting or sched.running) and a.finish_reason == FinishReason.ABORT


def test_preempted_request_recovers_shared_prefix_blocks():
    # Two identical sequences share cached blocks: after preemption, the victim takes them back.
    sched, pool = make(num_blocks=4, block_size=4, budget=64)
    a, b = req("a", 7, max_tokens=20), req("b", 7, max_tokens=20)
    sched.add(a)
    step(sched)
    sched.add(b)  # a step later: a's first block is cached by then, so b does not wait for it
    for _ in range(3):
        out, _ = step(sched)
        if out.num_preempted:
            break
    assert out.num_preempted == 1
    assert b.block_ids[:2] == a.block_ids[:2] and pool.ref_counts[a.block_ids[0]] == 2
    assert [s.request.request_id for s in out.seqs] == ["a", "b"]


def test_seed_outside_int64_is_refused_at_construction():
    with pytest.raises(ValueError, match="seed"):
        SamplingParams(seed=2**63)
    assert SamplingParams(seed=-(2**63)).seed == -(2**63)


# ---------------------------------------------------------------- prefixes being computed


def shared(rid, tail, max_tokens=2, **kw):
    """24 shared prompt tokens (6 blocks of 4), then `tail` tokens of its own."""
    ids = list(range(100, 124)) + [1000 + 10 * int(rid[-1]) + i for i in range(tail)]
    return Request(rid, ids, SamplingParams(max_tokens=max_tokens, **kw), eos_token_ids=frozenset({2}))


def run_all(sched):
    scheduled = []
    while sched.waiting or sched.running:
        out, _ = step(sched)
        scheduled.append([(s.request.request_id, s.num_new_tokens) for s in out.seqs])
    return scheduled


def test_a_burst_sharing_a_prefix_computes_it_once():
    sched, pool = make(num_blocks=64, block_size=4, budget=16, max_seqs=8)
    burst = [shared(f"r{i}", tail=3) for i in range(4)]
    for request in burst:
        sched.add(request)
    scheduled = run_all(sched)
    # r0 prefills in two chunks; the budget its second leaves is not spent on the blocks it is
    # computing: the others wait for them, then each computes only its own tail
    assert scheduled[:3] == [[("r0", 16)], [("r0", 11)], [("r0", 1), ("r1", 3), ("r2", 3), ("r3", 3)]]
    assert [r.num_cached_prompt_tokens for r in burst] == [0, 24, 24, 24]
    total = sum(n for seqs in scheduled for _, n in seqs)
    assert total == 27 + 3 * 3 + 4 * 1  # r0's prompt, the others' tails, one decode each
    assert pool.num_free == pool.num_blocks


def test_a_request_with_another_prompt_is_not_held_up_by_one_that_waits():
    sched, _ = make(num_blocks=64, block_size=4, budget=16, max_seqs=8)
    first, follower, other = shared("r0", 3), shared("r1", 3), req("x", 4, first=500)
    for request in (first, follower, other):
        sched.add(request)
    out, _ = step(sched)
    assert [(s.request.request_id, s.num_new_tokens) for s in out.seqs] == [("r0", 16)]  # budget spent
    out, _ = step(sched)
    # r0's last 11 tokens; r1 waits for r0's blocks; x takes the budget left
    assert [(s.request.request_id, s.num_new_tokens) for s in out.seqs] == [("r0", 11), ("x", 4)]
    assert list(sched.waiting) == [follower]


def test_a_request_that_reads_no_cache_does_not_wait():
    sched, _ = make(num_blocks=64, block_size=4, budget=64, max_seqs=8)
    first, uncached = shared("r0", 3), shared("r1", 3, read_prefix_cache=False)
    sched.add(first)
    sched.add(uncached)
    out, _ = step(sched)
    assert [(s.request.request_id, s.num_new_tokens) for s in out.seqs] == [("r0", 27), ("r1", 27)]


def test_a_waiting_request_goes_ahead_once_the_one_computing_its_prefix_is_aborted():
    sched, pool = make(num_blocks=64, block_size=4, budget=8, max_seqs=8)
    first, follower = shared("r0", 3), shared("r1", 3)
    sched.add(first)
    sched.add(follower)
    step(sched)  # r0 computed 8 tokens (two blocks, cached); r1 waits for the rest
    sched.finish(first, FinishReason.ABORT)
    out, _ = step(sched)
    assert [(s.request.request_id, s.num_new_tokens) for s in out.seqs] == [("r1", 8)]
    assert follower.num_cached_prompt_tokens == 8  # what r0 had computed before it went
    run_all(sched)
    assert follower.is_finished and pool.num_free == pool.num_blocks


def test_drafts_run_with_the_last_token_and_the_kept_ones_advance_the_request():
    pool = BlockPool(16)
    sched = Scheduler(SchedulerConfig(4, 64, 64, num_speculative_tokens=3), 4, pool)
    r = Request("a", [5, 6, 7, 8, 5, 6], SamplingParams(temperature=0, max_tokens=8), eos_token_ids=frozenset({2}))
    sched.add(r)
    sched.drafters["a"] = Drafter(kept=9.0, missed=1.0)  # its proposals came true before: all three run
    out = sched.schedule()
    sched.update(out, {"a": 7})  # prompt "... 5 6" then 7: the tail "6 7" recurs, followed by 8 5 6
    out = sched.schedule()
    (seq,) = out.seqs
    assert (seq.num_new_tokens, seq.draft, seq.samples) == (4, [8, 5, 6], True)
    finished = sched.update(out, {"a": 8}, {"a": [5, 1]})  # 8 and 5 stand; 1 follows the first that did not
    assert not finished and r.output_ids == [7, 8, 5, 1]
    assert r.num_computed_tokens == r.num_tokens - 1  # the last token, 1, is the only one not run yet


def test_kept_drafts_stop_at_the_first_token_that_ends_the_request():
    pool = BlockPool(16)
    sched = Scheduler(SchedulerConfig(4, 64, 64, num_speculative_tokens=4), 4, pool)
    r = Request("a", [5, 6, 7, 5, 6], SamplingParams(temperature=0, max_tokens=3), eos_token_ids=frozenset({2}))
    sched.add(r)
    sched.drafters["a"] = Drafter(kept=9.0, missed=1.0)
    sched.update(sched.schedule(), {"a": 7})
    out = sched.schedule()
    assert out.seqs[0].draft == [5]  # room for max_tokens 3: one draft, then the token after it
    finished = sched.update(out, {"a": 5}, {"a": [6]})
    assert finished == [r] and r.output_ids == [7, 5, 6] and r.finish_reason == FinishReason.LENGTH
    assert pool.num_free == pool.num_blocks


def drafts_after_one_step(config: SchedulerConfig, params: SamplingParams) -> list[int]:
    sched = Scheduler(config, 4, BlockPool(16))
    r = Request("a", [5, 6, 7, 8, 5, 6], params)
    sched.add(r)
    sched.drafters["a"] = Drafter(kept=9.0, missed=1.0)
    sched.update(sched.schedule(), {"a": 7})
    return sched.schedule().seqs[0].draft


def test_unseeded_sampling_takes_drafts_when_asked_and_seeded_or_penalised_sampling_does_not():
    greedy_only = SchedulerConfig(4, 64, 64, num_speculative_tokens=3)
    assert drafts_after_one_step(greedy_only, SamplingParams(temperature=0.8, top_p=0.9)) == []
    spec = SchedulerConfig(4, 64, 64, num_speculative_tokens=3, speculative_sampling=True)
    assert drafts_after_one_step(spec, SamplingParams(temperature=0.8, top_p=0.9)) == [8, 5, 6]
    assert drafts_after_one_step(spec, SamplingParams(temperature=0, seed=3)) == [8, 5, 6]  # greedy: the seed draws nothing
    for params in (SamplingParams(temperature=0.8, seed=3), SamplingParams(temperature=0.8, presence_penalty=0.5),
                   SamplingParams(temperature=0, logprobs=2), SamplingParams(temperature=0, logit_bias=((5, 1.0),))):
        assert drafts_after_one_step(spec, params) == [], params
    assert drafts_after_one_step(SchedulerConfig(4, 64, 64), SamplingParams(temperature=0)) == []  # speculation off


class FixedProposer:
    """A draft model that proposes `drafts` for every sequence, or none (prompt lookup drafts then)."""

    def __init__(self, num_tokens: int, drafts: list[int]):
        self.num_tokens, self.drafts = num_tokens, drafts
        self.asked: list[dict[str, int]] = []  # per call: request id -> room

    def propose(self, wanted):
        self.asked.append({rid: room for rid, (_, room) in wanted.items()})
        return {rid: self.drafts[:room] for rid, (_, room) in wanted.items()} if self.drafts else {}


def test_the_draft_model_and_prompt_lookup_each_take_their_own_count():
    """--draft-tokens 6 with prompt lookup's 3: a step the draft model drafts takes up to 6 of its
    tokens; a step it does not, lookup's up to 3 (a prompt "5 6 7 8 5 6 7 8 5 6" then 7 repeats)."""
    def first_draft(proposer):
        sched = Scheduler(SchedulerConfig(4, 64, 64, num_speculative_tokens=3), 4, BlockPool(16), proposer)
        sched.add(Request("a", [5, 6, 7, 8, 5, 6, 7, 8, 5, 6], SamplingParams(temperature=0, max_tokens=16)))
        sched.drafters["a"] = Drafter(kept=9.0, missed=1.0)
        sched.update(sched.schedule(), {"a": 7})
        return sched.schedule().seqs[0].draft

    assert first_draft(FixedProposer(6, [1, 2, 3, 4, 5, 6, 9, 9])) == [1, 2, 3, 4, 5, 6]
    assert first_draft(FixedProposer(6, [])) == [8, 5, 6]
    assert first_draft(FixedProposer(2, [])) == [8, 5, 6]  # a smaller draft count leaves lookup's alone


def decoding(sched: Scheduler, n: int) -> None:
    """`n` greedy requests of the prompt "i 5 6 7 8 5 6 7 8 5 6", past it (each sampled 7 once: the
    tail "6 7" recurs, followed by 8 5 6 7), every one's proposals kept at a rate of 0.98 before;
    busy steps draft (the pacer's measurements aside: see the tests of busy_pacer)."""
    sched.busy_pacer = AlwaysDraft()
    for i in range(n):
        prompt = [50 + i, 5, 6, 7, 8, 5, 6, 7, 8, 5, 6]  # their own first blocks: all admitted at once
        sched.add(Request(f"r{i}", prompt, SamplingParams(temperature=0, max_tokens=16)))
        sched.drafters[f"r{i}"] = Drafter(kept=49.0, missed=1.0)
    out = sched.schedule()
    assert [s.num_new_tokens for s in out.seqs] == [11] * n
    sched.update(out, {s.request.request_id: 7 for s in out.seqs})


def test_with_more_than_four_running_only_prompt_lookup_drafts_and_only_its_surest_tokens():
    proposer = FixedProposer(6, [1, 2, 3, 4, 5, 6])
    sched = Scheduler(SchedulerConfig(8, 64, 64, num_speculative_tokens=3), 4, BlockPool(64), proposer)
    decoding(sched, 4)
    assert [s.draft for s in sched.schedule().seqs] == [[1, 2, 3, 4, 5, 6]] * 4 and len(proposer.asked) == 1

    proposer = FixedProposer(6, [1, 2, 3, 4, 5, 6])
    sched = Scheduler(SchedulerConfig(8, 64, 64, num_speculative_tokens=3), 4, BlockPool(64), proposer)
    decoding(sched, 5)
    sched.drafters["r4"] = Drafter(kept=2.0, missed=1.0)  # rate 2/3: worth its first token with four running, not five
    sched.drafters["r3"] = Drafter(kept=9.0, missed=1.0)  # rate 0.9: its first token only
    drafts = [s.draft for s in sched.schedule().seqs]
    assert proposer.asked == [] and drafts == [[8, 5, 6]] * 3 + [[8], []]


def test_a_draft_model_without_prompt_lookup_leaves_busy_steps_undrafted():
    """--draft-model with --speculative-ngram 0: with more than four running nothing drafts."""
    for count, drafted in ((4, [[1, 2, 3, 4, 5, 6]] * 4), (5, [[]] * 5)):
        sched = Scheduler(SchedulerConfig(8, 64, 64, num_speculative_tokens=0), 4, BlockPool(64),
                          FixedProposer(6, [1, 2, 3, 4, 5, 6]))
        decoding(sched, count)
        assert [s.draft for s in sched.schedule().seqs] == drafted


@pytest.mark.parametrize("drafting, probing", [(False, False), (False, True), (True, False)])
def test_a_busy_step_of_decodes_drafts_as_its_pacer_says_and_is_timed_for_it(drafting, probing):
    sched = Scheduler(SchedulerConfig(8, 128, 64, num_speculative_tokens=3), 4, BlockPool(64))
    decoding(sched, 5)
    sched.busy_pacer = pacer = Recorder(drafting, probing)
    out = sched.schedule()
    drafts = [[8, 5, 6] if drafting else [] for _ in range(5)]
    assert out.paced and [s.draft for s in out.seqs] == drafts
    # a probe's proposals are tallied, none run; past it, a step without drafts looks nothing up
    assert [sched.drafters[f"r{i}"].last for i in range(5)] == [[8, 5, 6] if drafting or probing else []] * 5
    sched.step_done(out, 5 + sum(map(len, drafts)), 0.25)
    assert pacer.records == [(1 + len(drafts[0]), 0.25, 5)]


def test_only_busy_steps_of_decodes_that_could_draft_are_timed_for_the_pacer():
    def first_step(running: int, speculative: int = 3, prompt: bool = False):
        sched = Scheduler(SchedulerConfig(8, 128, 64, num_speculative_tokens=speculative), 4, BlockPool(64))
        decoding(sched, running)
        sched.busy_pacer = pacer = Recorder(True)
        if prompt:
            sched.add(Request("new", list(range(200, 210)), SamplingParams(temperature=0, max_tokens=16)))
        out = sched.schedule()
        sched.step_done(out, len(out.seqs), 0.25)
        return out.paced, pacer.records

    assert first_step(5) == (True, [(1.0, 0.25, 5)])
    assert first_step(4) == (False, [])  # four running: drafts always run (speculation.WORTH)
    assert first_step(5, speculative=0) == (False, [])  # nothing could draft
    assert first_step(5, prompt=True) == (False, [])  # a prompt in the step: no drafts


def test_drafts_come_out_of_what_the_running_requests_own_tokens_leave():
    sched = Scheduler(SchedulerConfig(8, 128, 64, num_speculative_tokens=3), 4, BlockPool(64))
    decoding(sched, 6)
    sched.config = replace(sched.config, max_num_batched_tokens=8)
    out = sched.schedule()
    assert [s.num_new_tokens - len(s.draft) for s in out.seqs] == [1] * 6  # every request's own token
    assert [s.draft for s in out.seqs] == [[8, 5]] + [[]] * 5  # the two rows left: the first request's drafts


def test_with_more_than_four_running_a_step_that_computes_a_prompt_runs_no_drafts():
    sched = Scheduler(SchedulerConfig(8, 128, 64, num_speculative_tokens=3), 4, BlockPool(64))
    decoding(sched, 5)
    sched.add(Request("new", list(range(200, 210)), SamplingParams(temperature=0, max_tokens=16)))
    out = sched.schedule()
    assert [(s.request.request_id, s.num_new_tokens) for s in out.seqs] == [(f"r{i}", 1) for i in range(5)] + [("new", 10)]
    assert all(not s.draft for s in out.seqs)
    sched.update(out, {s.request.request_id: 8 for s in out.seqs})  # "... 5 6 7 8": lookup proposes 5 6 7
    assert [s.draft for s in sched.schedule().seqs] == [[5, 6, 7]] * 5 + [[]]  # all decodes: they draft again


def test_a_prompt_takes_the_step_budget_before_drafts_and_with_four_running_they_still_run():
    sched = Scheduler(SchedulerConfig(8, 128, 64, num_speculative_tokens=3), 4, BlockPool(64))
    decoding(sched, 3)
    sched.config = replace(sched.config, max_num_batched_tokens=3 + 10 + 2)
    sched.add(Request("new", list(range(200, 210)), SamplingParams(temperature=0, max_tokens=16)))
    out = sched.schedule()
    assert [(s.request.request_id, s.num_new_tokens, s.draft) for s in out.seqs] == [
        ("r0", 3, [8, 5]), ("r1", 1, []), ("r2", 1, []), ("new", 10, [])]  # the two rows the prompt left


def test_a_busy_step_of_decodes_drafts_while_requests_wait_for_a_slot():
    sched = Scheduler(SchedulerConfig(5, 128, 64, num_speculative_tokens=3), 4, BlockPool(64))
    decoding(sched, 5)
    sched.add(Request("new", list(range(200, 210)), SamplingParams(temperature=0, max_tokens=16)))
    out = sched.schedule()  # no slot for "new": the step is all decodes, and drafts free slots sooner
    assert [s.draft for s in out.seqs] == [[8, 5, 6]] * 5 and list(sched.waiting)[0].request_id == "new"


def test_the_draft_model_is_asked_only_for_decodes_running_before_the_step_and_within_its_budget():
    proposer = FixedProposer(6, [1, 2, 3, 4, 5, 6])
    sched = Scheduler(SchedulerConfig(4, 64, 64, num_speculative_tokens=3), 4, BlockPool(64), proposer)
    prompt = [5, 6, 7, 8, 9, 10, 11, 12, 13]  # two full blocks the prefix cache keeps, and one token
    sched.add(Request("a", prompt, SamplingParams(temperature=0, max_tokens=16)))
    sched.update(sched.schedule(), {"a": 7})
    sched.add(Request("b", prompt, SamplingParams(temperature=0, max_tokens=16)))
    sched.config = replace(sched.config, max_num_batched_tokens=1 + 1 + 2)
    out = sched.schedule()  # "b" decodes its last prompt token from the cache, admitted this step
    assert [(s.request.request_id, s.num_new_tokens, s.draft) for s in out.seqs] == [("a", 3, [1, 2]), ("b", 1, [])]
    assert proposer.asked == [{"a": 2}]  # not "b", and no more than the two rows left

    sched.update(out, {"a": 3, "b": 7})
    sched.add(Request("c", list(range(100, 140)), SamplingParams(temperature=0, max_tokens=16)))
    assert [s.draft for s in sched.schedule().seqs] == [[], [], []]  # the prompt took the budget
    assert len(proposer.asked) == 1  # with no rows left the draft model was not run


def test_sequences_decoding_side_by_side_keep_their_blocks_together():
    sched, pool = make(num_blocks=64, block_size=4, budget=64)
    a, b = req("a", 4, max_tokens=20), req("b", 4, max_tokens=20)
    sched.add(a)
    sched.add(b)
    blocks = {}
    while sched.running or sched.waiting:
        step(sched)
        blocks.update({r.request_id: list(r.block_ids) for r in (a, b) if r.block_ids})
    assert blocks == {"a": [0, 1, 2, 3, 4, 5], "b": [6, 7, 8, 9, 10, 11]}  # 4 + 20 tokens: six blocks each
    assert pool.num_free == pool.num_blocks and pool.spares == {}


def test_spares_stop_at_the_last_token_a_request_can_compute_and_leave_with_it():
    sched, pool = make(num_blocks=64, block_size=4, budget=64)
    r = req("r", 5, max_tokens=4)  # at most 5 + 4 - 1 = 8 tokens of keys and values: two blocks
    sched.add(r)
    step(sched)
    assert len(r.block_ids) == 2 and pool.spares == {}
    long = req("long", 5, max_tokens=40, first=500)
    sched.add(long)
    step(sched)
    assert pool.spares == {"long": [4, 5, 6, 7, 8, 9, 10, 11]}
    sched.finish(long, FinishReason.ABORT)
    assert pool.spares == {} and pool.num_free == pool.num_blocks - 2



# ---------------------------------------------------------------- drafts of the text a constraint forces


SCHEMA = GrammarSpec("json_schema", "{}")  # the scheduler only asks whether a request has a constraint


def forced_scheduler(forced: list[int], speculative: int = 3) -> tuple[Scheduler, list[str]]:
    """A scheduler whose constrained requests' grammars force `forced` next; the ids it asked about."""
    asked = []

    def hook(request: Request, wanted: int) -> list[int]:
        asked.append(request.request_id)
        return forced[:wanted]

    return Scheduler(SchedulerConfig(8, 64, 64, num_speculative_tokens=speculative), 4, BlockPool(64),
                     forced=hook), asked


def past_the_prompt(sched: Scheduler, **params) -> None:
    """Requests "c" (constrained) and "p" (plain) of the prompts "5 6 7 8 5 6" and "30 5 6 7 8 5 6",
    each having sampled 7 (prompt lookup would propose 8 5 6 for both), their lookups kept at a rate
    of 0.9 before."""
    for rid, grammar, first in (("c", SCHEMA, []), ("p", None, [30])):
        sched.add(Request(rid, first + [5, 6, 7, 8, 5, 6],
                          SamplingParams(**{"temperature": 0, "max_tokens": 16, **params}, grammar=grammar)))
        sched.drafters[rid] = Drafter(kept=9.0, missed=1.0)
    sched.update(sched.schedule(), {"c": 7, "p": 7})


def test_a_constrained_request_drafts_the_text_its_grammar_forces_before_prompt_lookup():
    sched, asked = forced_scheduler([20, 21, 22, 23, 24])
    past_the_prompt(sched)
    drafts = {s.request.request_id: s.draft for s in sched.schedule().seqs}
    # at most K = 3 of the forced tokens, all three worth running at the prior rate of 0.75
    assert drafts == {"c": [20, 21, 22], "p": [8, 5, 6]} and asked == ["c"]
    assert sched.forced_drafters["c"].last == [20, 21, 22] and sched.drafters["c"].last == []  # lookup proposed none


def test_forced_drafts_that_do_not_come_true_run_fewer_tokens_then_none():
    sched, _ = forced_scheduler([20, 21, 22, 23])
    past_the_prompt(sched)
    counts = []
    for _ in range(5):
        out = sched.schedule()
        counts.append(len(out.seqs[0].draft))
        sched.update(out, {"c": 9, "p": 9})  # never the forced text's first token: no draft stands
    assert counts == [3, 2, 1, 1, 0]  # rates 0.75, 0.56, 0.42, 0.32, 0.24


def test_no_forced_drafts_where_the_grammar_forces_nothing_or_drafts_are_off():
    sched, asked = forced_scheduler([])  # nothing forced now: prompt lookup drafts as for any request
    past_the_prompt(sched)
    assert [s.draft for s in sched.schedule().seqs] == [[8, 5, 6], [8, 5, 6]] and asked == ["c"]

    sched, asked = forced_scheduler([20, 21], speculative=0)  # --speculative-ngram 0: no drafts of any kind
    past_the_prompt(sched)
    assert [s.draft for s in sched.schedule().seqs] == [[], []] and asked == []

    sched, asked = forced_scheduler([20, 21])  # a seeded sampled request takes no drafts (speculation.drafts_for)
    past_the_prompt(sched, temperature=0.5, seed=3)
    assert [s.draft for s in sched.schedule().seqs] == [[], []] and asked == []


def test_a_busy_probe_step_runs_no_forced_drafts():
    sched, asked = forced_scheduler([20, 21, 22])
    sched.busy_pacer = AlwaysDraft()
    for i in range(5):
        sched.add(Request(f"r{i}", [50 + i, 5, 6, 7, 8, 5, 6, 7, 8, 5, 6],
                          SamplingParams(temperature=0, max_tokens=16, grammar=SCHEMA)))
    sched.update(sched.schedule(), {f"r{i}": 7 for i in range(5)})
    sched.busy_pacer = Recorder(False, True)  # timing plain steps: proposals tallied, none run
    assert [s.draft for s in sched.schedule().seqs] == [[]] * 5 and asked == []
    sched.busy_pacer = Recorder(True, False)
    sched.forced_drafters.update({f"r{i}": Drafter(kept=99.0, missed=1.0) for i in range(5)})
    assert [s.draft for s in sched.schedule().seqs] == [[20, 21, 22]] * 5  # busy: only sure ones (0.99 ** 3 >= 0.9)
