"""The step-time fit and the prompt tokens it allows beside decodes (engine/step_cost.py), and the
scheduler's use of it (SchedulerConfig.max_step_ms)."""

import random
from dataclasses import replace

import pytest

from lmserve.cache.block_pool import BlockPool
from lmserve.config import SchedulerConfig
from lmserve.engine import step_cost
from lmserve.engine.scheduler import Scheduler
from lmserve.engine.step_cost import Fit, StepCost, prompt_budget
from lmserve.request import Request, SamplingParams


def test_the_fit_tells_a_decode_rows_cost_from_a_prompt_tokens():
    rng = random.Random(0)
    cost = StepCost()
    for _ in range(200):
        decodes, prompt = rng.choice([16, 32, 40]), rng.choice([0, 0, 100, 300, 480])
        cost.record(decodes, prompt, (0.012 + 0.0011 * decodes + 0.0004 * prompt) * rng.uniform(0.95, 1.05))
    fit = cost.fit()
    assert fit.per_prompt == pytest.approx(0.0004, rel=0.05) and fit.per_decode == pytest.approx(0.0011, rel=0.15)
    assert fit.fixed == pytest.approx(0.012, abs=0.005)


def test_decode_rows_that_never_vary_go_into_the_fixed_cost():
    cost = StepCost()
    for prompt in [0, 500] * 20:
        cost.record(32, prompt, 0.040 + 0.0005 * prompt)
    fit = cost.fit()
    assert fit.per_prompt == pytest.approx(0.0005, rel=0.01) and fit.per_decode == pytest.approx(0.0, abs=1e-5)
    assert fit.fixed + 32 * fit.per_decode == pytest.approx(0.040, rel=0.01)


def test_the_fit_waits_for_steps_with_prompts_of_different_sizes():
    cost = StepCost()
    for decodes in [1, 8, 32] * 20:
        cost.record(decodes, 0, 0.001 * decodes)  # decodes alone: no telling what a prompt token costs
    assert cost.fit() is None
    cost.record(32, 512, 0.4)
    assert cost.fit() is not None


def test_the_fit_follows_the_recent_steps():
    cost = StepCost()
    for prompt in [0, 512] * 50:
        cost.record(32, prompt, 0.001 * prompt)
    for prompt in [0, 512] * 50:  # the machine twice as slow since
        cost.record(32, prompt, 0.002 * prompt)
    assert cost.fit().per_prompt == pytest.approx(0.002, rel=0.02)


def test_a_cost_that_does_not_grow_with_prompt_tokens_bounds_nothing():
    cost = StepCost()
    for prompt in [0, 512] * 10:
        cost.record(32, prompt, 0.5 if prompt == 0 else 0.1)
    assert cost.fit() is None


def test_the_prompt_budget_keeps_the_step_within_the_bound():
    fit = Fit(0.010, 0.001, 0.0005)  # 10 ms, 1 ms a decode, 0.5 ms a prompt token
    assert prompt_budget(fit, 32, 150) == 216  # 10 + 32 + 0.5 * 216 = 150 ms
    assert prompt_budget(fit, 0, 150) is None  # no one decoding: the token budget alone
    assert prompt_budget(fit, 32, 0) is None  # bound off
    assert prompt_budget(None, 32, 150) is None  # nothing measured yet


def test_decodes_past_the_bound_still_leave_the_prompt_its_share():
    fit = Fit(0.010, 0.0005, 0.0005)
    decode = 0.010 + 0.0005 * 400  # 210 ms: past a 150 ms bound on their own
    tokens = prompt_budget(fit, 400, 150)
    assert decode + 0.0005 * tokens == pytest.approx(decode / step_cost.DECODE_SHARE, abs=0.0005)
    assert prompt_budget(Fit(0.0, 0.1, 0.1), 1, 100) == step_cost.MIN_PROMPT_TOKENS  # never fewer


def timed(sched: Scheduler, fixed: float, per_token: float) -> None:
    """Feed the scheduler's step cost steps of 2-8 decodes with 0-200 prompt tokens costing fixed +
    per_token * tokens, decodes and prompt tokens alike."""
    for decodes, prompt in [(2, 0), (8, 200), (8, 0), (2, 100)] * 10:
        sched.step_cost.record(decodes, prompt, fixed + per_token * (decodes + prompt))


def running(sched: Scheduler, n: int) -> None:
    """`n` requests past their 3-token prompts, each decoding."""
    for i in range(n):
        sched.add(Request(f"r{i}", [10 + i, 11, 12], SamplingParams(max_tokens=50)))
    out = sched.schedule()
    sched.update(out, {s.request.request_id: 7 for s in out.seqs})


def test_a_step_that_decodes_takes_only_the_prompt_tokens_its_time_allows():
    sched = Scheduler(SchedulerConfig(8, 512, 1024, max_step_ms=60), 4, BlockPool(512))
    running(sched, 4)
    timed(sched, 0.010, 0.001)  # 10 ms and 1 ms a token: 4 decodes and 46 prompt tokens make 60 ms
    sched.add(Request("long", list(range(100, 400)), SamplingParams(max_tokens=4)))
    out = sched.schedule()
    assert [(s.request.request_id, s.num_new_tokens) for s in out.seqs] == [(f"r{i}", 1) for i in range(4)] + [
        ("long", 46)]
    assert out.prompt_bounded
    sched.update(out, {s.request.request_id: 7 for s in out.seqs if s.samples})
    out = sched.schedule()  # the prompt, running now, goes on by the same bound
    assert [(s.request.request_id, s.num_new_tokens) for s in out.seqs][-1] == ("long", 46) and out.prompt_bounded
    for _ in range(5):  # 46 a step: 276 after six
        sched.update(out, {s.request.request_id: 7 for s in out.seqs if s.samples})
        out = sched.schedule()
    assert [(s.request.request_id, s.num_new_tokens) for s in out.seqs][-1] == ("long", 24)  # its last 24 of 300
    assert not out.prompt_bounded  # all it had left fit


def test_without_decodes_or_with_the_bound_off_a_prompt_takes_the_whole_budget():
    sched = Scheduler(SchedulerConfig(8, 512, 1024, max_step_ms=60), 4, BlockPool(512))
    timed(sched, 0.010, 0.001)
    sched.add(Request("long", list(range(100, 400)), SamplingParams(max_tokens=4)))
    out = sched.schedule()
    assert [s.num_new_tokens for s in out.seqs] == [300] and not out.prompt_bounded  # no one waits on this step

    sched = Scheduler(SchedulerConfig(8, 512, 1024, max_step_ms=0), 4, BlockPool(512))
    running(sched, 4)
    timed(sched, 0.010, 0.001)
    sched.add(Request("long", list(range(100, 400)), SamplingParams(max_tokens=4)))
    assert [s.num_new_tokens for s in sched.schedule().seqs] == [1, 1, 1, 1, 300]


def test_the_bound_is_shared_by_running_chunks_and_new_prompts_and_decodes_always_run():
    sched = Scheduler(SchedulerConfig(8, 512, 1024, max_step_ms=60), 4, BlockPool(512))
    running(sched, 2)
    timed(sched, 0.010, 0.001)  # 2 decodes: 48 prompt tokens
    sched.add(Request("a", list(range(100, 140)), SamplingParams(max_tokens=4)))  # 40 tokens
    sched.add(Request("b", list(range(200, 300)), SamplingParams(max_tokens=4)))
    out = sched.schedule()
    assert [(s.request.request_id, s.num_new_tokens) for s in out.seqs] == [("r0", 1), ("r1", 1), ("a", 40), ("b", 8)]
    sched.update(out, {s.request.request_id: 7 for s in out.seqs if s.samples})
    out = sched.schedule()  # "a" decodes now too: 3 decodes, 47 tokens for "b"
    assert [(s.request.request_id, s.num_new_tokens) for s in out.seqs] == [
        ("r0", 1), ("r1", 1), ("a", 1), ("b", 47)]


def test_a_prompt_left_waiting_by_the_bound_marks_the_step():
    sched = Scheduler(SchedulerConfig(8, 512, 1024, max_step_ms=60), 4, BlockPool(512))
    running(sched, 2)
    timed(sched, 0.010, 0.001)  # 2 decodes: 48 prompt tokens
    sched.add(Request("a", list(range(100, 148)), SamplingParams(max_tokens=4)))  # exactly 48
    sched.add(Request("b", list(range(200, 210)), SamplingParams(max_tokens=4)))
    out = sched.schedule()
    assert [s.request.request_id for s in out.seqs] == ["r0", "r1", "a"] and out.prompt_bounded  # "b" waits on it


def test_recorded_steps_are_each_steps_decode_rows_and_prompt_tokens():
    sched = Scheduler(SchedulerConfig(8, 512, 1024), 4, BlockPool(512))
    running(sched, 2)
    sched.add(Request("new", list(range(100, 130)), SamplingParams(max_tokens=4)))
    out = sched.schedule()
    seen = []
    sched.step_cost.record = lambda *args: seen.append(args)
    sched.step_done(out, 2, 0.02)
    assert seen == [(2, 30, 0.02)]


def test_the_config_refuses_a_negative_bound():
    with pytest.raises(ValueError, match="max_step_ms"):
        SchedulerConfig(max_step_ms=-1)
    assert replace(SchedulerConfig(), max_step_ms=0).max_step_ms == 0
