"""The engine on the real default model: continuous batching over the paged cache gives each
sequence exactly what it gets alone; seeds, stop strings and aborts behave per sequence."""

from __future__ import annotations

import os

import pytest

from lmserve.engine.step_cost import Fit
from lmserve.request import FinishReason, SamplingParams
from tests.helpers.real_engine import PROMPTS, chat_ids, make_engine


def run_staggered(engine, prompts, params, start_every=2):
    """Add one prompt every `start_every` steps while the others run."""
    tokens = {f"r{i}": [] for i in range(len(prompts))}
    pending = list(enumerate(prompts))
    steps = 0
    while pending or engine.has_unfinished:
        if pending and steps % start_every == 0:
            i, prompt = pending.pop(0)
            engine.add_request(f"r{i}", prompt, params)
        for out in engine.step().outputs:
            tokens[out.request_id].extend(out.new_token_ids)
        steps += 1
    return [tokens[f"r{i}"] for i in range(len(prompts))]


def assert_all_blocks_free(engine):
    load = engine.load()
    assert load.num_free_kv_blocks == load.num_kv_blocks and load.num_running == load.num_waiting == 0


@pytest.fixture(scope="module")
def engine(default_model):
    return make_engine(default_model)


@pytest.fixture(scope="module")
def prompt_ids(default_model):
    return [chat_ids(default_model.tokenizer, p) for p in PROMPTS]


GREEDY_12 = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def alone(default_model, prompt_ids):
    """Each prompt's GREEDY_12 tokens run alone on a cold engine (no prefix cache), computed once
    for the tests that compare batching, chunking, preemption and prefix hits with it."""
    cold = make_engine(default_model, prefix_caching=False)
    return [cold.generate([ids], GREEDY_12)[0] for ids in prompt_ids]


def test_paris(engine, default_model):
    [out] = engine.generate([chat_ids(default_model.tokenizer, PROMPTS[0])], SamplingParams(temperature=0, max_tokens=20))
    assert "Paris" in default_model.tokenizer.decode(out)


def test_staggered_batch_equals_each_prompt_alone(engine, prompt_ids, alone):
    assert len({len(ids) for ids in prompt_ids}) == len(prompt_ids)  # all lengths differ
    assert run_staggered(engine, prompt_ids, GREEDY_12) == alone
    assert_all_blocks_free(engine)


def test_tiny_budget_chunks_and_preempts_without_changing_outputs(default_model, prompt_ids, alone):
    # 15 blocks of 16 tokens: not enough for all 8 at once, so requests get preempted.
    tight = make_engine(default_model, kv_bytes=15 * 16 * 46080, budget=16, max_len=240)
    assert tight.load().num_kv_blocks == 15
    preempted = 0
    original_step = tight.step

    def counting_step():
        nonlocal preempted
        step = original_step()
        preempted += step.stats.num_preempted if step.stats is not None else 0
        return step

    tight.step = counting_step
    got = run_staggered(tight, prompt_ids, GREEDY_12, start_every=1)
    assert preempted > 0
    assert got == alone


class SlowTokens:
    """A step cost whose fit says each token takes a second: a step that decodes may take
    step_cost.MIN_PROMPT_TOKENS prompt tokens (as many as its decodes, if more). Keeps what the
    engine records."""

    def __init__(self):
        self.records = []

    def record(self, decode_rows, prompt_tokens, seconds):
        self.records.append((decode_rows, prompt_tokens, seconds))

    def fit(self):
        return Fit(0.0, 1.0, 1.0)


def test_a_time_bound_on_prompts_beside_decodes_chunks_them_without_changing_outputs(default_model, prompt_ids,
                                                                                       alone):
    bounded = make_engine(default_model, budget=512, max_step_ms=100)
    cost = bounded._scheduler.step_cost = SlowTokens()
    schedule, steps = bounded._scheduler.schedule, []

    def recording_schedule():
        out = schedule()
        steps.append([(seq.num_new_tokens, seq.runs_as_decode_rows) for seq in out.seqs])
        return out

    bounded._scheduler.schedule = recording_schedule
    step, marked = bounded.step, []

    def marking_step():
        done = step()
        marked.append(done.stats is not None and done.stats.prompt_bounded)
        return done

    bounded.step = marking_step
    assert run_staggered(bounded, prompt_ids, GREEDY_12, start_every=1) == alone
    mixed = [step for step in steps if any(decode for _, decode in step)]
    prompt_tokens = [sum(n for n, decode in step if not decode) for step in mixed]
    assert max(prompt_tokens) == 16 and max(len(ids) for ids in prompt_ids) > 16  # bounded, and it had to be
    assert marked[0] is False and sum(marked) >= 1  # the steps' stats say which were (the metrics count them)
    assert max(sum(n for n, decode in step if not decode) for step in steps) > 16  # steps without decodes: not
    assert [(d, p) for d, p, _ in cost.records] == [(sum(n for n, decode in step if decode),
                                                     sum(n for n, decode in step if not decode))
                                                    for step in steps if step]


def test_seeded_sampling_ignores_batch_neighbours(engine, prompt_ids):
    seeded = SamplingParams(temperature=1.0, seed=1234, max_tokens=10, ignore_eos=True)
    [alone] = engine.generate([prompt_ids[1]], seeded)
    engine.add_request("noise-a", prompt_ids[0], SamplingParams(temperature=1.0, max_tokens=10))
    engine.add_request("noise-b", prompt_ids[3], SamplingParams(temperature=0.7, max_tokens=10))
    [together] = engine.generate([prompt_ids[1]], seeded)
    while engine.has_unfinished:
        engine.step()
    assert together == alone


def test_stop_string_finishes_and_is_not_emitted(engine, default_model):
    tok = default_model.tokenizer
    engine.add_request("s", chat_ids(tok, PROMPTS[0]), SamplingParams(temperature=0, max_tokens=30, stop=("France",)))
    outputs = []
    while engine.has_unfinished:
        outputs.extend(engine.step().outputs)
    text = "".join(o.text_delta for o in outputs)
    assert outputs[-1].finish_reason == FinishReason.STOP
    assert text == "The capital of "


def test_abort_frees_blocks(engine, prompt_ids):
    engine.add_request("a", prompt_ids[3], SamplingParams(temperature=0, max_tokens=50))
    engine.step()
    assert engine.load().num_free_kv_blocks < engine.load().num_kv_blocks
    engine.abort_request("a")
    assert_all_blocks_free(engine)
    assert not engine.has_unfinished


def test_prompt_longer_than_context_is_refused(engine):
    with pytest.raises(ValueError, match="1024"):
        engine.add_request("long", [1] * 1024, SamplingParams())


def test_model_failure_errors_that_batch_and_engine_keeps_serving(engine, prompt_ids):
    engine.add_request("doomed", prompt_ids[0], SamplingParams(temperature=0, max_tokens=5))
    original = engine._runner.execute  # fault injection reaches inside

    def broken(out, live):
        raise RuntimeError("simulated device failure")

    engine._runner.execute = broken
    try:
        step = engine.step()
    finally:
        engine._runner.execute = original
    [output] = step.outputs
    assert output.finish_reason == FinishReason.ERROR and "simulated device failure" in output.error
    assert step.stats is None and not engine.has_unfinished
    assert_all_blocks_free(engine)
    [after] = engine.generate([prompt_ids[0]], SamplingParams(temperature=0, max_tokens=5))
    assert len(after) == 5


def test_a_request_the_sampler_cannot_sample_fails_alone(engine, prompt_ids):
    greedy = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    solo = engine.generate([prompt_ids[1]], greedy)[0]
    poisoned = SamplingParams(temperature=0.5, top_k=7, max_tokens=6, ignore_eos=True)
    original = engine._runner.sampler  # fault injection reaches inside

    def sampler(logits, meta):  # fails whenever the poisoned request is in the batch
        if any(p.top_k == 7 for p in meta.params):
            raise RuntimeError("cannot sample this row")
        return original(logits, meta)

    engine._runner.sampler = sampler
    try:
        engine.add_request("poisoned", prompt_ids[0], poisoned)
        engine.add_request("healthy", prompt_ids[1], greedy)
        outputs: dict[str, list] = {"poisoned": [], "healthy": []}
        while engine.has_unfinished:
            for output in engine.step().outputs:
                outputs[output.request_id].append(output)
    finally:
        engine._runner.sampler = original
    assert outputs["poisoned"][-1].finish_reason == FinishReason.ERROR
    assert "cannot sample this row" in outputs["poisoned"][-1].error
    assert [t for o in outputs["healthy"] for t in o.new_token_ids] == solo
    assert_all_blocks_free(engine)


def test_prefix_cache_hit_gives_the_cold_output(default_model, prompt_ids, alone):
    warm_engine = make_engine(default_model)
    warm_engine.generate([prompt_ids[7]], GREEDY_12)  # caches the shared system prompt and more
    cached = []
    for ids in prompt_ids:
        warm_engine.add_request("w", ids, GREEDY_12)
        tokens = []
        while warm_engine.has_unfinished:
            for out in warm_engine.step().outputs:
                tokens.extend(out.new_token_ids)
                cached.append(out.num_cached_tokens)
        assert tokens == alone[prompt_ids.index(ids)]
    assert min(cached) >= 16  # every prompt reused at least the system prompt's first block


def test_a_burst_sharing_a_system_prompt_computes_it_once_and_answers_as_alone(default_model):
    # prompts sharing a system prompt longer than one step's budget, added at once: the first
    # computes the shared blocks, the others wait for them, and every answer is the cold one
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    cold_engine = make_engine(default_model, prefix_caching=False)
    tokenizer = default_model.tokenizer
    system = "You are a careful assistant for a hardware shop. " * 12
    burst = [tokenizer.encode(tokenizer.apply_chat_template([{"role": "system", "content": system},
                                                             {"role": "user", "content": question}]),
                              add_special_tokens=False)
             for question in ("Do you sell hammers?", "When do you open?", "Where are you?", "Hi!")]
    cold = [cold_engine.generate([ids], params)[0] for ids in burst]
    engine = make_engine(default_model, budget=48)
    for i, ids in enumerate(burst):
        engine.add_request(f"b{i}", ids, params)
    tokens: dict[str, list[int]] = {}
    cached: dict[str, int] = {}
    computed = 0
    while engine.has_unfinished:
        step = engine.step()
        computed += step.stats.num_scheduled_tokens if step.stats else 0
        for out in step.outputs:
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
            cached[out.request_id] = out.num_cached_tokens
    assert [tokens[f"b{i}"] for i in range(4)] == cold
    shared_blocks = min(len(os.path.commonprefix([burst[0], ids])) for ids in burst[1:]) // 16
    assert shared_blocks >= 7 and all(cached[f"b{i}"] >= 16 * shared_blocks for i in (1, 2, 3))
    assert computed == sum(len(ids) for ids in burst) - sum(cached.values()) + 4 * (params.max_tokens - 1)
    assert_all_blocks_free(engine)


def test_close_aborts_live_requests_and_lets_go_of_the_model(default_model, prompt_ids):
    from lmserve.engine.step_types import EngineClosed

    engine = make_engine(default_model)
    engine.add_request("running", prompt_ids[0], SamplingParams(temperature=0, max_tokens=50))
    engine.add_request("waiting", prompt_ids[1], SamplingParams(temperature=0, max_tokens=50))
    engine.step()
    outputs = engine.close(why="unloading for a test")
    assert {(o.request_id, o.finish_reason, o.error) for o in outputs} == {
        ("running", FinishReason.ABORT, "unloading for a test"), ("waiting", FinishReason.ABORT, "unloading for a test")}
    assert engine.closed and engine.model is None and not engine.has_unfinished
    assert_all_blocks_free(engine)
    with pytest.raises(EngineClosed):
        engine.add_request("late", prompt_ids[0], SamplingParams())


def test_a_constraint_that_does_not_compile_is_refused_when_added(engine, prompt_ids):
    from lmserve.request import GrammarSpec
    from lmserve.sampling.grammar import GrammarError

    with pytest.raises(GrammarError, match="parenthesis"):
        engine.add_request("bad", prompt_ids[0], SamplingParams(grammar=GrammarSpec("regex", "(a")))
    assert not engine.has_unfinished
