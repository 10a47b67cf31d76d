"""Speculative decoding with a draft model (engine/draft_model.py): on the real default model in
float32 (batch-invariant, so any difference would be speculation's) with its int4 copy as the
draft, token for token and text for text what plain greedy decoding gives, in fewer steps; on
tiny random models, exact where the draft is mostly wrong, and refused where its tokens differ."""

from __future__ import annotations

import pytest

from lmserve.cache.prefix import hash_full_blocks
from lmserve.config import DEFAULT_SPECULATIVE_TOKENS, CacheConfig, DraftConfig, EngineConfig, SchedulerConfig
from lmserve.engine.engine import LLMEngine
from lmserve.request import SamplingParams
from tests.helpers.pacing import AlwaysDraft
from tests.helpers.real_engine import PROMPTS, chat_ids, make_engine, tiny_engine
from tests.helpers.tiny_models import save_hf_folder, tiny_hf_model
from tests.model.test_speculation import REPEATING, run


def drafted_engine(target, draft, tokens=6, paced=False) -> LLMEngine:
    """An engine drafted by `draft`; unless `paced`, drafting at every step (not only where the
    pacer finds that it pays), so the tests see the drafts' effect on every step."""
    config = EngineConfig("unused", "test", cache=CacheConfig(16, 64 << 20), draft=DraftConfig("unused", tokens=tokens),
                          scheduler=SchedulerConfig(8, 64, 1024, num_speculative_tokens=DEFAULT_SPECULATIVE_TOKENS))
    engine = LLMEngine(config, target, draft)
    if not paced:
        engine._draft.pacer = AlwaysDraft()
    return engine


@pytest.fixture(scope="module")
def engines(default_model, int4_model):
    return make_engine(default_model), drafted_engine(default_model, int4_model)


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0, max_tokens=48),
    SamplingParams(temperature=0, max_tokens=9),
    SamplingParams(temperature=0, max_tokens=48, stop=("banana, cherry", "lazy", "\n\n")),
], ids=["eos", "max_tokens", "stop"])
def test_draft_model_gives_exactly_plain_greedy_decoding(default_model, engines, params):
    plain, drafted = engines
    prompts = [chat_ids(default_model.tokenizer, text) for text in REPEATING[:1] + PROMPTS[:3]]
    for batch in ([prompts[0]], prompts):  # alone, and four at once (the draft model's most: MAX_RUNNING)
        kept = drafted.num_accepted_tokens
        expected, plain_steps = run(plain, batch, params)
        got, drafted_steps = run(drafted, batch, params)
        assert got == expected
        assert drafted_steps < plain_steps and drafted.num_accepted_tokens > kept


def test_kept_drafts_each_save_a_step_and_are_counted(default_model, engines):
    plain, drafted = engines
    prompt = chat_ids(default_model.tokenizer, PROMPTS[3])  # no repeats: prompt lookup would find little
    params = SamplingParams(temperature=0, max_tokens=60, ignore_eos=True)
    proposed, kept = drafted.num_draft_tokens, drafted.num_accepted_tokens
    expected, plain_steps = run(plain, [prompt], params)
    got, drafted_steps = run(drafted, [prompt], params)
    assert got == expected and len(got[0][0]) == 60
    kept = drafted.num_accepted_tokens - kept
    assert kept >= 30 and drafted.num_draft_tokens - proposed >= kept  # int4 agrees with float32 mostly
    assert drafted_steps == plain_steps - kept


def test_the_draft_engine_reuses_its_cached_blocks_between_proposals(default_model, int4_model):
    drafted = drafted_engine(default_model, int4_model)
    prompt = chat_ids(default_model.tokenizer, PROMPTS[7])  # ~60 tokens: three full blocks and more
    run(drafted, [prompt], SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))
    pool = drafted._draft.engine._pool
    assert pool.num_queries > 0 and pool.num_hits / pool.num_queries > 0.8


def test_forgetting_a_prefix_forgets_the_draft_models_blocks_of_it_too(default_model, int4_model):
    drafted = drafted_engine(default_model, int4_model)
    prompt = chat_ids(default_model.tokenizer, PROMPTS[7])  # three full blocks and more
    run(drafted, [prompt], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    draft_pool = drafted._draft.engine._pool
    hashes = hash_full_blocks(prompt, 16)
    assert len(draft_pool.cached_run(hashes)) == len(hashes) >= 3  # the draft's proposals cached them
    assert drafted.forget_prefix(prompt) == 16 * len(hashes)
    assert draft_pool.cached_run(hashes) == []


def test_a_mostly_wrong_draft_model_changes_nothing(tmp_path):
    target = save_hf_folder(tiny_hf_model("llama", vocab_size=64, seed=1), tmp_path / "target")
    other = save_hf_folder(tiny_hf_model("llama", vocab_size=64, seed=2), tmp_path / "draft")
    plain, drafted = tiny_engine(target, num_blocks=128), tiny_engine(target, num_blocks=128, speculative=4, draft=other)
    prompts = [[1, 2, 3, 4, 5], [7, 8, 9], [10] * 9, [3, 1, 4, 1, 5, 9, 2, 6]]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    expected, _ = run(plain, prompts, params)
    assert run(drafted, prompts, params)[0] == expected
    assert drafted.num_draft_tokens >= 100 and drafted.num_accepted_tokens < drafted.num_draft_tokens / 2


def test_a_draft_model_with_other_tokens_is_refused(default_model, tmp_path):
    from lmserve.weights.load import LoadedModel, load_weights
    from tests.helpers.real_engine import IdTokenizer

    model, config, _ = load_weights(save_hf_folder(tiny_hf_model("llama", vocab_size=64), tmp_path / "d"), "float32")
    other = LoadedModel(model, config, IdTokenizer(64), "float32")
    with pytest.raises(ValueError, match=r"token 0 is b'<0>' to the draft model and b'<\|endoftext\|>' to the model"):
        drafted_engine(default_model, other)
    wide, wide_config, _ = load_weights(save_hf_folder(tiny_hf_model("llama", vocab_size=49160), tmp_path / "w"),
                                        "float32")
    wider = LoadedModel(wide, wide_config, default_model.tokenizer, "float32")  # the same tokens, padded logits
    with pytest.raises(ValueError, match=r"the draft model's logits \(49160\) are wider than the model's \(49152\)"):
        drafted_engine(default_model, wider)


def test_a_failing_draft_model_costs_drafts_not_requests(default_model, int4_model, engines, caplog):
    plain, _ = engines
    drafted = drafted_engine(default_model, int4_model)
    draft_engine, calls = drafted._draft.engine, []
    real_step = draft_engine.step

    def failing_step():
        calls.append(1)
        if len(calls) in (2, 5):  # in the middle of a proposal: its requests are left behind unless aborted
            raise RuntimeError("draft step failed")
        return real_step()

    draft_engine.step = failing_step
    prompt = chat_ids(default_model.tokenizer, PROMPTS[3])
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    expected, _ = run(plain, [prompt], params)
    with caplog.at_level("ERROR", logger="lmserve.engine"):
        got, _ = run(drafted, [prompt], params)
    assert got == expected and len(calls) > 5 and drafted.num_accepted_tokens > 0
    assert "the draft model failed" in caplog.text and not draft_engine.has_unfinished
    drafted.close()
    assert draft_engine.closed  # unloading the model lets go of its draft too


def proposals_by_step(engine, prompt, params) -> tuple[list[int], list[bool]]:
    """One request run alone: its tokens, and for each step that asked the draft model, whether it
    drafted (False: prompt lookup drafted instead)."""
    asked, propose = [], engine._draft.propose

    def counted(wanted):
        proposals = propose(wanted)
        asked.append(bool(proposals))
        return proposals

    engine._draft.propose = counted
    engine.add_request("paced", prompt, params)
    tokens = []
    while engine.has_unfinished:
        tokens += [t for out in engine.step().outputs for t in out.new_token_ids]
    return tokens, asked


def slowed(engine, seconds: float):
    """Make every model call of `engine` take `seconds` longer (inside its step, which is timed)."""
    import time

    runner = engine._runner
    execute = runner.execute

    def slow_execute(*args):
        time.sleep(seconds)
        return execute(*args)

    runner.execute = slow_execute


def test_drafts_that_do_not_pay_stop_after_their_trial(tmp_path):
    from lmserve.engine.speculation import PROBE_STEPS, TRIAL_STEPS

    folder = save_hf_folder(tiny_hf_model("llama", vocab_size=64, seed=1), tmp_path / "m")
    plain = tiny_engine(folder, num_blocks=128)
    drafted = tiny_engine(folder, num_blocks=128, speculative=4, draft=folder, paced=True)
    slowed(drafted._draft.engine, 0.015)  # each draft token costs many of the model's steps
    params = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)
    expected, _ = run(plain, [[1, 2, 3, 4, 5]], params)
    tokens, drafted_steps = proposals_by_step(drafted, [1, 2, 3, 4, 5], params)
    assert tokens == expected[0][0]
    trial = TRIAL_STEPS + 1  # its first step, catching up, is not timed
    assert drafted_steps[:PROBE_STEPS + trial] == [False] * PROBE_STEPS + [True] * trial
    assert len(drafted_steps) > PROBE_STEPS + trial + 5 and not any(drafted_steps[PROBE_STEPS + trial:])


def test_drafts_that_pay_run_after_their_trial(tmp_path):
    from lmserve.engine.speculation import PROBE_STEPS, TRIAL_STEPS

    folder = save_hf_folder(tiny_hf_model("llama", vocab_size=64, seed=1), tmp_path / "m")
    drafted = tiny_engine(folder, num_blocks=128, speculative=4, draft=folder, paced=True)  # itself: all kept
    slowed(drafted, 0.02)  # the model's steps are dear, the draft's cheap
    params = SamplingParams(temperature=0, max_tokens=240, ignore_eos=True)
    _, drafted_steps = proposals_by_step(drafted, [1, 2, 3, 4, 5], params)
    trial_end = PROBE_STEPS + TRIAL_STEPS + 1
    assert not any(drafted_steps[:PROBE_STEPS]) and len(drafted_steps) > trial_end + 3
    assert all(drafted_steps[PROBE_STEPS:])
