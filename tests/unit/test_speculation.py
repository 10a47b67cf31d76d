"""Prompt lookup (engine/speculation.py): which tokens become drafts, and who gets them."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
import torch

from lmserve.engine.runner import ModelRunner, StepResult
from lmserve.engine.speculation import BUSY_WORTH, LOOKBACK, MAX_RUNNING, WORTH, Drafter, drafts_for, worth
from lmserve.request import GrammarSpec, SamplingParams
from lmserve.sampling.grammar import GrammarCompiler
from lmserve.sampling.sampler import Sampler
from tests.helpers.grammar import MarkupTokenizer
from tests.helpers.pacing import Recorder


def propose(ids: list[int], num_tokens: int) -> list[int]:
    return Drafter().lookup(ids, num_tokens)


def test_the_tokens_after_the_latest_earlier_occurrence_of_the_tail_are_the_draft():
    ids = [1, 2, 3, 9, 9, 1, 2, 3, 7, 8, 5, 1, 2, 3]
    assert propose(ids, 3) == [7, 8, 5]  # the latest earlier "1 2 3" is followed by 7 8 5
    assert propose(ids, 1) == [7]
    assert propose(ids, 0) == []


def test_the_longest_recurring_tail_wins_and_a_single_token_is_not_enough():
    # "4 2 3" recurs (followed by 6); "2 3" alone recurs later (followed by 5): the longer match wins
    ids = [4, 2, 3, 6, 6, 2, 3, 5, 0, 4, 2, 3]
    assert propose(ids, 2) == [6, 6]
    assert propose([5, 1, 8, 1], 2) == []  # only "1" recurs
    assert propose([7, 7], 3) == []
    assert propose([], 3) == []


def test_a_draft_near_the_end_is_shorter_and_the_lookup_stays_in_its_window():
    assert propose([1, 2, 1, 2], 4) == [1, 2]
    far = [1, 2, 3] + [0] * LOOKBACK + [1, 2]
    assert propose(far, 2) == []  # its only earlier "1 2" is past the lookback


def test_the_lookup_follows_a_growing_sequence_as_a_fresh_one_would():
    rng = random.Random(0)
    drafter, ids = Drafter(), []
    for _ in range(400):
        ids.append(rng.randrange(6))
        assert drafter.lookup(ids, 3) == propose(list(ids), 3) == slow_lookup(ids, 3)


def slow_lookup(ids: list[int], num_tokens: int) -> list[int]:
    """The definition: scan every earlier position, longest tail first, latest occurrence first."""
    for n in range(min(4, len(ids) - 1), 1, -1):
        for start in range(len(ids) - n - 1, -1, -1):
            if ids[start:start + n] == ids[len(ids) - n:]:
                return ids[start + n:start + n + num_tokens]
    return []


def test_drafts_run_only_while_they_come_true():
    ids = [1, 2, 3, 4] * 3
    drafter = Drafter()
    assert len(drafter.drafts(ids, 4)) == 1  # rate 0.5 at first: only the first token is worth it
    for _ in range(6):  # the text keeps repeating: every proposal comes true, and more of it runs
        ids += [ids[-4]]
        drafter.drafts(ids, 4)
    assert len(drafter.drafts(ids + [ids[-4]], 4)) == 4
    wrong = Drafter()
    ids = [1, 2, 3, 4] * 3
    for step in range(8):  # the text never follows the proposal: soon nothing runs
        ids += [9 + step, 1, 2]
        wrong.drafts(ids, 4)
        ids += [50 + step]
    assert wrong.drafts(ids + [1, 2], 4) == []
    assert wrong.rate < WORTH


def test_a_busy_step_runs_only_drafts_kept_more_often():
    assert worth(1) == worth(MAX_RUNNING) == WORTH < BUSY_WORTH == worth(MAX_RUNNING + 1) == worth(64)
    ids = [1, 2, 3, 4] * 3
    drafter = Drafter(kept=2.0, missed=1.0)  # rate 2/3
    assert len(drafter.drafts(ids, 4, worth(MAX_RUNNING))) == 2  # 2/3 and 4/9 >= 0.3
    drafter = Drafter(kept=2.0, missed=1.0)
    assert drafter.drafts(ids, 4, worth(MAX_RUNNING + 1)) == [] and drafter.last == [1, 2, 3, 4]  # proposed, not run
    repeating = Drafter(kept=49.0, missed=1.0)  # rate 0.98: 0.98, 0.96, 0.94, 0.92 >= 0.9
    assert len(repeating.drafts(ids, 4, worth(64))) == 4
    fading = Drafter(kept=9.0, missed=1.0)  # rate 0.9: 0.9, then 0.81
    assert len(fading.drafts(ids, 4, worth(64))) == 1


def test_sampled_sequences_take_drafts_only_when_the_server_says_so():
    params = SamplingParams(temperature=0.7)
    assert not drafts_for(params) and drafts_for(params, sampled=True)


@pytest.mark.parametrize("params, expected", [
    (SamplingParams(temperature=0), True),
    (SamplingParams(temperature=0, stop=("x",), max_tokens=5, seed=3), True),
    (SamplingParams(temperature=0.7, top_p=0.9, top_k=40, min_p=0.05), True),
    (SamplingParams(temperature=0, grammar=GrammarSpec("regex", "[a-z ]+")), True),  # each draft row masked
    (SamplingParams(temperature=0.7, seed=3), False),
    (SamplingParams(temperature=0, logprobs=0), False),
    (SamplingParams(temperature=0, logit_bias=((1, 2.0),)), False),
    (SamplingParams(temperature=0, repetition_penalty=1.1), False),
    (SamplingParams(temperature=0, presence_penalty=0.5), False),
    (SamplingParams(temperature=0, min_tokens=2), False),
])
def test_only_sequences_sampled_from_the_logits_alone_take_drafts(params, expected):
    assert drafts_for(params, sampled=True) is expected


# ---------------------------------------------------------------- a pacer (the draft model's, busy steps')


def pace(pacer, steps: int, plain_rate: float, drafted_rate: float, seconds=(1.0, 1.0), num_seqs=1) -> list[bool]:
    """Run `steps` decode steps of `num_seqs` sequences, giving `drafted_rate` tokens each in
    `seconds[1]` when drafting and `plain_rate` in `seconds[0]` otherwise; the modes the pacer chose."""
    modes = []
    for _ in range(steps):
        modes.append(pacer.drafting)
        pacer.record(drafted_rate if pacer.drafting else plain_rate, seconds[pacer.drafting], num_seqs)
    return modes


def test_the_pacer_keeps_drafting_where_drafts_pay_and_stops_where_they_do_not():
    from lmserve.engine.speculation import KEEP_FACTOR, KEEP_STEPS, PROBE_STEPS, TRIAL_STEPS, Pacer

    trial = TRIAL_STEPS + 1  # a trial's first step is not timed
    cycle = PROBE_STEPS + trial + max(KEEP_STEPS, KEEP_FACTOR * (PROBE_STEPS + TRIAL_STEPS))  # steps of 1 s
    paying = pace(Pacer("drafts"), 2 * cycle, plain_rate=1.0, drafted_rate=2.5)
    assert paying[:PROBE_STEPS] == [False] * PROBE_STEPS  # without drafts timed first
    assert all(paying[PROBE_STEPS:cycle]) and not any(paying[cycle:cycle + PROBE_STEPS])  # and again later
    assert sum(paying) == 2 * (cycle - PROBE_STEPS)
    losing = pace(Pacer("drafts"), 2 * cycle, plain_rate=1.0, drafted_rate=0.6)
    assert sum(losing) == 2 * trial  # only the trials draft
    assert not any(losing[PROBE_STEPS + trial:cycle])


def test_a_trial_that_took_long_is_kept_from_for_longer():
    from lmserve.engine.speculation import KEEP_FACTOR, KEEP_STEPS, PROBE_STEPS, TRIAL_STEPS, Pacer

    # drafted steps of 10 s giving 5 tokens, plain ones of 1 s giving 1: the trial took 160 s timed
    modes = pace(Pacer("drafts"), 5000, plain_rate=1.0, drafted_rate=5.0, seconds=(1.0, 10.0))
    keep = KEEP_FACTOR * (PROBE_STEPS + 10 * TRIAL_STEPS)  # plain steps of a second
    start = PROBE_STEPS + TRIAL_STEPS + 1
    assert keep > KEEP_STEPS and modes[start:start + keep + PROBE_STEPS] == [False] * (keep + PROBE_STEPS)
    assert modes[start + keep + PROBE_STEPS] is True  # the next trial


def test_the_pacer_follows_a_change_in_what_pays():
    from lmserve.engine.speculation import KEEP_FACTOR, KEEP_STEPS, PROBE_STEPS, TRIAL_STEPS, Pacer

    timed = PROBE_STEPS + TRIAL_STEPS + 1
    cycle = timed + max(KEEP_STEPS, KEEP_FACTOR * (PROBE_STEPS + TRIAL_STEPS))
    pacer = Pacer("drafts")
    assert not any(pace(pacer, cycle, plain_rate=1.0, drafted_rate=0.5)[timed:])
    assert all(pace(pacer, cycle, plain_rate=1.0, drafted_rate=3.0)[PROBE_STEPS:])  # the text became easy


def paced_sizes(pacer, sizes: list[int], plain_rate, drafted_rate) -> list[bool]:
    """Steps of 1 s with sizes[i] sequences decoding; rates by size: the modes the pacer chose."""
    modes = []
    for n in sizes:
        modes.append(pacer.drafting)
        pacer.record(drafted_rate[n] if pacer.drafting else plain_rate[n], 1.0, n)
    return modes


def test_drafts_are_compared_with_plain_steps_of_their_own_batch_size():
    """Drafts 10% slower than plain steps at both 1 and 4 sequences, but the trial ran mostly at 1
    (where every step gives a sequence more tokens/s) and the probe mostly at 4: all steps pooled,
    the drafts would look 1.7x faster. Compared size by size, they do not pay."""
    from lmserve.engine.speculation import PROBE_STEPS, TRIAL_STEPS, Pacer

    plain, drafted = {1: 2.0, 4: 0.5}, {1: 1.8, 4: 0.45}
    probe = [4] * 12 + [1] * 4
    trial = [1] + [4] * 4 + [1] * 12  # its first step is not timed
    assert len(probe) == PROBE_STEPS and len(trial) == TRIAL_STEPS + 1
    pooled = (sum(drafted[n] for n in trial[1:]) / TRIAL_STEPS) / (sum(plain[n] for n in probe) / PROBE_STEPS)
    assert pooled > 1.5
    modes = paced_sizes(Pacer("drafts"), probe + trial + [1] * 10, plain, drafted)
    assert modes[:PROBE_STEPS] == [False] * PROBE_STEPS and all(modes[PROBE_STEPS:PROBE_STEPS + len(trial)])
    assert not any(modes[PROBE_STEPS + len(trial):])  # not kept
    faster = {1: 2.2, 4: 0.55}  # 10% faster at each size: kept
    modes = paced_sizes(Pacer("drafts"), probe + trial + [1] * 10, plain, faster)
    assert all(modes[PROBE_STEPS:])


def test_a_pacer_in_turns_of_one_step_alternates_and_sees_past_a_drifting_rate():
    """Drafts 3% faster than plain steps at every moment, while every sequence's rate falls 1% a
    step (contexts growing in a flow): timed one side after the other, the drafts come 17 steps
    later and look 13% slower; timed a step each in turn, they are kept."""
    from lmserve.engine.speculation import PROBE_STEPS, TRIAL_STEPS, Pacer

    def drifting(pacer, steps: int) -> list[bool]:
        modes = []
        for step in range(steps):
            modes.append(pacer.drafting)
            pacer.record(0.99 ** step * (1.03 if pacer.drafting else 1.0), 1.0, 8)
        return modes

    timed = PROBE_STEPS + TRIAL_STEPS
    in_turns = drifting(Pacer("drafts", turn=1, warm=False), timed + 10)
    assert in_turns[:timed] == [False, True] * (timed // 2) and all(in_turns[timed:])
    one_then_other = drifting(Pacer("drafts"), timed + 1 + 10)  # a trial's first step is not timed
    assert all(one_then_other[PROBE_STEPS:timed + 1]) and not any(one_then_other[timed + 1:])


def test_a_trial_in_which_no_draft_stood_is_not_kept_however_quick_its_steps():
    """Drafted steps that gave a token a sequence, as plain ones do, but ran 10% quicker (noise, or
    steps in which no draft ran): the drafts gained nothing, and drafting is not kept."""
    from lmserve.engine.speculation import PROBE_STEPS, TRIAL_STEPS, Pacer

    timed = PROBE_STEPS + TRIAL_STEPS
    modes = pace(Pacer("drafts", turn=1, warm=False), timed + 10, plain_rate=1.0, drafted_rate=1.0, seconds=(1.0, 0.9))
    assert modes[:timed] == [False, True] * (timed // 2) and not any(modes[timed:])
    modes = pace(Pacer("drafts", turn=1, warm=False), timed + 10, plain_rate=1.0, drafted_rate=1.05, seconds=(1.0, 0.9))
    assert all(modes[timed:])  # some drafts stood: kept


def test_a_turn_ends_where_its_side_has_been_timed_in_full(monkeypatch):
    from lmserve.engine import speculation

    monkeypatch.setattr(speculation, "TRIAL_STEPS", 6)
    modes = pace(speculation.Pacer("drafts", turn=4, warm=False), 16 + 6 + 5, plain_rate=1.0, drafted_rate=0.5)
    # plain 4, drafted 4, plain 4, drafted 2 (the trial's 6), then plain steps until the probe's 16
    assert modes[:22] == [False] * 4 + [True] * 4 + [False] * 4 + [True] * 2 + [False] * 8
    assert not any(modes[22:])  # judged: drafts at half the rate are not kept


def test_a_trial_with_no_batch_size_of_its_probe_is_timed_again():
    from lmserve.engine.speculation import PROBE_STEPS, TRIAL_STEPS, Pacer

    plain, drafted = {1: 4.0, 4: 1.0}, {1: 3.0, 4: 3.0}
    sizes = [4] * PROBE_STEPS + [1] * (TRIAL_STEPS + 1) + [1] * (PROBE_STEPS + TRIAL_STEPS + 1) + [1] * 10
    modes = paced_sizes(Pacer("drafts"), sizes, plain, drafted)
    first_trial_end = PROBE_STEPS + TRIAL_STEPS + 1
    assert all(modes[PROBE_STEPS:first_trial_end])  # drafts at 1 against plain at 4: not compared,
    assert not any(modes[first_trial_end:first_trial_end + PROBE_STEPS])  # both timed again at 1
    second_trial_end = first_trial_end + PROBE_STEPS + TRIAL_STEPS + 1
    assert all(modes[first_trial_end + PROBE_STEPS:second_trial_end])
    assert not any(modes[second_trial_end:])  # 3 < 4 tokens/s at one sequence: not kept


class NoRoomEngine:
    """A draft engine every sequence is too long for (add_request refuses each)."""

    has_unfinished = False

    def add_request(self, *args, **kwargs):
        raise ValueError("longer than the draft model's context")


class FailingEngine:
    """A draft engine whose steps fail."""

    def __init__(self):
        self.has_unfinished = False

    def add_request(self, *args, **kwargs):
        self.has_unfinished = True

    def step(self):
        raise RuntimeError("draft step failed")

    def abort_request(self, name):
        self.has_unfinished = False


@pytest.mark.parametrize("engine", [NoRoomEngine(), FailingEngine()], ids=["past-its-context", "failing"])
def test_a_drafting_step_whose_draft_model_drafted_nothing_is_not_timed(engine):
    """Every sequence past the draft's context, or the draft model failing: prompt lookup drafts
    in its place (no proposals), so the step is timed neither as drafted nor as plain."""
    from lmserve.engine.draft_model import DraftModel

    draft = DraftModel(engine=engine)
    draft.pacer = Recorder(drafting=True)
    draft.step_started()
    assert draft.propose({"a": ([1, 2, 3], 4), "b": ([4, 5], 4)}) == {}
    draft.step_done(num_decodes=2, num_tokens=5, seconds=0.5, prefill=False)
    assert draft.pacer.records == []


def test_only_decode_steps_that_asked_the_draft_model_are_timed():
    from lmserve.engine.draft_model import DraftModel

    draft = DraftModel(engine=None)
    draft.pacer = Recorder(drafting=False)
    draft.step_started()
    assert draft.propose({"a": ([1, 2, 3], 4)}) == {}  # not drafting: prompt lookup drafts instead
    draft.step_done(num_decodes=2, num_tokens=3, seconds=0.5, prefill=False)
    draft.step_started()  # a step that never asked: not timed
    draft.step_done(num_decodes=2, num_tokens=2, seconds=0.1, prefill=False)
    draft.step_started()
    draft.propose({"a": ([1, 2, 3], 4)})
    draft.step_done(num_decodes=1, num_tokens=1, seconds=0.9, prefill=True)  # a prompt chunk shared it
    draft.step_started()
    draft.propose({"a": ([1, 2, 3], 4)})
    draft.step_done(num_decodes=0, num_tokens=0, seconds=0.2, prefill=False)  # nothing decoded
    assert draft.pacer.records == [(1.5, 0.5, 2)]


# ---------------------------------------------------------------- drafts under a grammar


def test_under_a_grammar_each_draft_row_is_masked_by_the_grammar_after_the_drafts_before_it():
    # One byte a token (ids 3-258). Grammar "ab+c"; the step picked "a" (its matcher has taken it),
    # the drafts are "a", "b", "b". The row after the first draft most favours "x", which the
    # grammar refuses there, then "b"; the row after "ab" favours "c". Masked, the picks are "b"
    # (the second draft stands) and "c" (the third does not): "b", "c" are kept.
    compiler = GrammarCompiler(MarkupTokenizer(), 259)
    matcher = compiler.matcher(GrammarSpec("regex", "ab+c"))
    byte = lambda text: ord(text) + 3  # noqa: E731
    assert matcher.accept_token(byte("a"))
    request = SimpleNamespace(request_id="r", params=SamplingParams(temperature=0))
    seq = SimpleNamespace(request=request, draft=[byte("a"), byte("b"), byte("b")])
    logits = torch.zeros(3, 259)
    logits[0, byte("x")], logits[0, byte("b")] = 9.0, 5.0
    logits[1, byte("c")], logits[1, byte("b")] = 9.0, 5.0
    runner = object.__new__(ModelRunner)
    runner.sampler = Sampler()
    step = StepResult({"r": byte("a")}, {})
    runner._verify_drafts(logits, [seq], {"r": SimpleNamespace(matcher=matcher)}, step)
    assert step.accepted == {"r": [byte("b"), byte("c")]} and step.num_accepted_tokens == 2
    assert matcher.is_completed()  # the kept tokens were fed to the grammar: "abc"
    compiler.close()
