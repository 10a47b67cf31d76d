"""Sampling state and bans through the real engine, on a tiny random-weight model: Mirostat's mu
carried from step to step in each request's own record, and min_tokens holding eos and stop
ids off until enough tokens are out."""

from __future__ import annotations

from dataclasses import replace

import pytest

from lmserve.request import FinishReason, SamplerChain, SamplingParams
from lmserve.weights.load import LoadedModel, load_weights
from tests.helpers.real_engine import make_engine
from tests.helpers.tiny_models import tiny_hf_model, write_gguf

PROMPTS = [[1, 5, 9, 13, 17], [3, 3, 8], [250, 4, 77, 120, 6, 6, 1]]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, default_tokenizer):
    """A 300-token random llama with the default model's tokenizer (its eos ids are 0 and 2)."""
    path = write_gguf(tiny_hf_model("llama", seed=11), tmp_path_factory.mktemp("tiny") / "tiny.gguf", "llama")
    model, config, _ = load_weights(path, "float32", max_positions=256)
    return LoadedModel(model, config, default_tokenizer, "float32")


def run(engine, requests: dict[str, tuple[list[int], SamplingParams]]) -> dict[str, tuple[list[int], FinishReason]]:
    for rid, (prompt, params) in requests.items():
        engine.add_request(rid, prompt, params)
    tokens = {rid: [] for rid in requests}
    finished = {}
    while engine.has_unfinished:
        for out in engine.step().outputs:
            tokens[out.request_id].extend(out.new_token_ids)
            if out.finished:
                finished[out.request_id] = out.finish_reason
    return {rid: (tokens[rid], finished[rid]) for rid in requests}


class RecordingSampler:
    """Wraps the runner's sampler (reaching inside, as a probe) to record Mirostat's mu in and out."""

    def __init__(self, sampler):
        self.sampler = sampler
        self.steps: list[dict[str, tuple[float | None, float | None]]] = []

    def __call__(self, logits, meta):
        out = self.sampler(logits, meta)
        mus_out = out.mirostat_mu or [None] * len(meta.params)
        self.steps.append({p.seed: (mu_in, mu_out) for p, mu_in, mu_out in zip(meta.params, meta.mirostat_mu, mus_out)})
        return out


def test_mirostat_mu_is_carried_per_request_across_steps(tiny):
    engine = make_engine(tiny, max_len=256)
    recorder = RecordingSampler(engine._runner.sampler)
    engine._runner.sampler = recorder
    v1 = SamplingParams(seed=1, max_tokens=12, ignore_eos=True, chain=SamplerChain(mirostat=1, mirostat_tau=3.0))
    v2 = SamplingParams(seed=2, max_tokens=12, ignore_eos=True,
                        chain=SamplerChain(mirostat=2, mirostat_tau=4.0, mirostat_eta=0.2))
    plain = SamplingParams(seed=3, max_tokens=12, ignore_eos=True)
    together = run(engine, {"v1": (PROMPTS[0], v1), "v2": (PROMPTS[1], v2), "plain": (PROMPTS[2], plain)})

    for seed, tau in ((1, 3.0), (2, 4.0)):
        trail = [step[seed] for step in recorder.steps if seed in step]
        assert len(trail) == 12
        assert trail[0][0] is None  # the first step starts from 2 * tau
        assert all(later[0] == earlier[1] for earlier, later in zip(trail, trail[1:]))  # carried over
        assert len({mu_out for _, mu_out in trail}) > 6 and trail[0][1] != 2 * tau  # and really updated
    assert all(step[3] == (None, None) for step in recorder.steps if 3 in step)

    alone = {rid: run(engine, {rid: (prompt, params)})[rid]
             for rid, prompt, params in (("v1", PROMPTS[0], v1), ("v2", PROMPTS[1], v2))}
    assert together["v1"] == alone["v1"] and together["v2"] == alone["v2"]  # each mu its own
    assert len(set(together["v2"][0])) > 1


def test_min_tokens_holds_eos_off(tiny):
    engine = make_engine(tiny, max_len=256)
    eager_eos = SamplingParams(temperature=0.0, max_tokens=10, logit_bias=((2, 100.0),))
    results = run(engine, {"eager": (PROMPTS[0], eager_eos),
                           "held": (PROMPTS[0], replace(eager_eos, min_tokens=4)),
                           "sampled": (PROMPTS[1], SamplingParams(seed=5, max_tokens=10, min_tokens=6,
                                                                  logit_bias=((2, 100.0),)))})
    assert results["eager"] == ([], FinishReason.STOP)
    assert len(results["held"][0]) == 4 and results["held"][1] == FinishReason.STOP
    assert len(results["sampled"][0]) == 6 and 2 not in results["sampled"][0]


def test_min_tokens_holds_stop_token_ids_off(tiny):
    engine = make_engine(tiny, max_len=256)
    params = SamplingParams(temperature=0.0, max_tokens=10, logit_bias=((7, 100.0),), stop_token_ids=(7,),
                            min_tokens=3, chain=SamplerChain())
    [(tokens, reason)] = run(engine, {"r": (PROMPTS[2], params)}).values()
    assert len(tokens) == 3 and 7 not in tokens and reason == FinishReason.STOP
