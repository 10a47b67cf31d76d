"""Sampler and logits processors: exact checks, seeded reproducibility, sampling frequencies."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from lmserve.request import SamplingParams
from lmserve.sampling.processors import (
    BiasTensors,
    RowTokens,
    apply_logit_bias,
    apply_presence_frequency_penalties,
    apply_repetition_penalty,
)
from lmserve.sampling.sampler import Sampler, SamplingMetadata, to_sample_logprobs

sampler = Sampler()


def make_meta(params, prompt_ids=None, output_ids=None, generators=None) -> SamplingMetadata:
    n = len(params)
    return SamplingMetadata(
        params=list(params),
        prompt_ids=prompt_ids or [[] for _ in range(n)],
        output_ids=output_ids or [[] for _ in range(n)],
        generators=generators or [None] * n,
    )


def sample(logits, params, **kwargs) -> torch.Tensor:
    return sampler(logits, make_meta(params, **kwargs)).token_ids


def random_logits(num_rows: int, vocab_size: int, seed: int, scale: float = 3.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(num_rows, vocab_size, generator=g) * scale  # (B, V)


def repeated(probs: list[float], num_rows: int) -> torch.Tensor:
    """(num_rows, V) logits whose softmax is `probs` in every row."""
    return torch.tensor(probs).log().expand(num_rows, -1).contiguous()


# ---- greedy and its limits -----------------------------------------------------------------


def test_greedy_is_argmax():
    logits = random_logits(7, 1000, seed=0)
    tokens = sample(logits, [SamplingParams(temperature=0.0)] * 7)
    assert tokens.dtype == torch.int64 and tokens.shape == (7,)
    assert torch.equal(tokens, logits.argmax(dim=-1))


def test_greedy_rows_in_mixed_batch_are_argmax():
    logits = random_logits(6, 1000, seed=1)
    params = [SamplingParams(temperature=0.0 if i % 2 == 0 else 1.0) for i in range(6)]
    tokens = sample(logits, params)
    assert torch.equal(tokens[::2], logits[::2].argmax(dim=-1))


def separated_logits(num_rows: int, vocab_size: int, seed: int) -> torch.Tensor:
    """Random logits whose argmax leads the runner-up by at least 1."""
    logits = random_logits(num_rows, vocab_size, seed)
    top = logits.argmax(dim=-1)
    logits[torch.arange(num_rows), top] += 1.0
    return logits


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=1e-4),
    SamplingParams(temperature=1.0, top_k=1),
    SamplingParams(temperature=1.5, top_p=1e-6),
    SamplingParams(temperature=1.5, top_k=50, top_p=1e-6),
    SamplingParams(temperature=1.5, min_p=1.0),
], ids=["temperature->0", "top_k=1", "tiny top_p", "top_k+tiny top_p", "min_p=1"])
def test_degenerate_filters_equal_greedy(params):
    torch.manual_seed(0)
    logits = separated_logits(64, 500, seed=2)
    for _ in range(5):
        assert torch.equal(sample(logits, [params] * 64), logits.argmax(dim=-1))


# ---- filters -------------------------------------------------------------------------------

PROBS = [0.5, 0.3, 0.15, 0.05]


@pytest.mark.parametrize("top_k", [0, 4])
def test_min_p_filters_tokens_below_fraction_of_max(top_k):
    torch.manual_seed(0)
    # min_p 0.2 of max 0.5 = 0.1: tokens 0, 1, 2 stay, token 3 (0.05) goes.
    tokens = sample(repeated(PROBS, 4000), [SamplingParams(min_p=0.2, top_k=top_k)] * 4000)
    assert set(tokens.tolist()) == {0, 1, 2}


@pytest.mark.parametrize("top_k", [0, 3])
def test_top_p_keeps_smallest_prefix_reaching_p(top_k):
    torch.manual_seed(0)
    # top_p 0.7: token 0 (mass before 0) and 1 (mass before 0.5) stay; token 2 (before 0.8) goes.
    tokens = sample(repeated(PROBS, 8000), [SamplingParams(top_p=0.7, top_k=top_k)] * 8000)
    counts = torch.bincount(tokens, minlength=4).tolist()
    assert counts[2:] == [0, 0]
    assert counts[0] / 8000 == pytest.approx(0.5 / 0.8, abs=0.02)


def test_top_p_applies_to_distribution_renormalised_after_top_k():
    torch.manual_seed(0)
    # top_k 2 leaves 0.5/0.8 and 0.3/0.8 = 0.625, 0.375; top_p 0.6 then keeps token 0 only.
    tokens = sample(repeated(PROBS, 2000), [SamplingParams(top_k=2, top_p=0.6)] * 2000)
    assert set(tokens.tolist()) == {0}


def test_top_k_keeps_k_most_likely():
    torch.manual_seed(0)
    tokens = sample(repeated(PROBS, 4000), [SamplingParams(top_k=2)] * 4000)
    assert set(tokens.tolist()) == {0, 1}


def test_top_k_keeps_every_token_tied_at_the_cut():
    torch.manual_seed(0)
    logits = torch.tensor([0.0, 1.0, 1.0, 2.0, 1.0]).expand(2000, -1).contiguous()
    tokens = sample(logits, [SamplingParams(top_k=2)] * 2000)
    assert set(tokens.tolist()) == {1, 2, 3, 4}


def test_top_p_applies_after_min_p_renormalised():
    torch.manual_seed(0)
    # min_p 0.2 drops token 3, leaving 0.5, 0.3, 0.15 of mass 0.95; mass before token 2 is then
    # 0.8 / 0.95 = 0.84 >= 0.82, so top_p drops it too (vLLM's order; HF's would keep it).
    tokens = sample(repeated(PROBS, 4000), [SamplingParams(min_p=0.2, top_p=0.82)] * 4000)
    assert set(tokens.tolist()) == {0, 1}


# ---- processors, exactly -------------------------------------------------------------------

# Multiples of 1/4 with penalties 0.5, 0.25, 2: every expected value below is exact in float32.
BASE = torch.tensor([[2.0, -1.0, 0.5, -0.25, 3.0, 0.0],
                     [1.0, 1.0, -2.0, 4.0, -0.5, 0.75]])


def test_repetition_penalty_divides_positive_and_multiplies_negative():
    logits = BASE.clone()
    tokens = RowTokens.build([0], [[0, 1, 1, 3, 5]], logits.device)  # duplicates count once
    apply_repetition_penalty(logits, tokens, [2.0])
    expected = BASE.clone()
    expected[0] = torch.tensor([1.0, -2.0, 0.5, -0.5, 3.0, 0.0])
    assert torch.equal(logits, expected)  # row 1 untouched


def test_presence_and_frequency_penalties_subtract_exact_amounts():
    logits = BASE.clone()
    tokens = RowTokens.build([1, 0], [[3, 3, 3, 0], [4]], logits.device)
    apply_presence_frequency_penalties(logits, tokens, presence=[0.25, 1.0], frequency=[0.5, -0.5])
    expected = BASE.clone()
    expected[1, 3] -= 3 * 0.5 + 0.25
    expected[1, 0] -= 1 * 0.5 + 0.25
    expected[0, 4] -= 1 * -0.5 + 1.0
    assert torch.equal(logits, expected)


def test_row_tokens_pads_with_a_real_id_and_counts_occurrences():
    tokens = RowTokens.build([2, 0], [[5, 1, 5], [7]], torch.device("cpu"))
    assert tokens.ids.tolist() == [[5, 1, 5], [7, 7, 7]]
    assert tokens.valid.tolist() == [[True, True, True], [True, False, False]]
    counts = tokens.counts(8)
    assert counts[0, 5].item() == 2 and counts[1, 7].item() == 1 and counts.sum().item() == 4


def test_logit_bias_adds_to_listed_rows():
    logits = BASE.clone()
    apply_logit_bias(logits, [1], [BiasTensors.of(((2, 0.5), (5, -100.0)))])
    expected = BASE.clone()
    expected[1, 2] += 0.5
    expected[1, 5] += -100.0
    assert torch.equal(logits, expected)


def test_logit_bias_on_many_rows_equals_adding_each_entry():
    # rows with many biases (repeated ids included), none, and a few, in one batched scatter
    generator = torch.Generator().manual_seed(0)
    for _ in range(50):
        base = torch.randn(5, 40, generator=generator)
        biases = [tuple((int(t), float(v)) for t, v in zip(torch.randint(0, 40, (n,), generator=generator),
                                                             torch.randn(n, generator=generator)))
                  for n in (3, 0, 17)]
        rows = [4, 1, 0]
        expected = base.clone()
        for row, bias in zip(rows, biases):
            for token_id, value in bias:
                expected[row, token_id] += value
        logits = base.clone()
        apply_logit_bias(logits, rows, [BiasTensors.of(bias) for bias in biases])
        torch.testing.assert_close(logits, expected)


def test_the_requests_own_bias_tensors_are_used_and_made_from_params_otherwise():
    params = [SamplingParams(temperature=0.0, logit_bias=((1, 50.0),))] * 2
    own = BiasTensors.of(((2, 50.0),))  # the engine's copy, made when the request was added
    meta = make_meta(params, prompt_ids=[[], []], output_ids=[[], []])
    meta.logit_bias = [own, None]
    assert sampler(torch.zeros(2, 4), meta).token_ids.tolist() == [2, 1]


def test_logit_bias_rejects_out_of_vocabulary_ids():
    with pytest.raises(ValueError, match="outside the vocabulary"):
        apply_logit_bias(BASE.clone(), [0], [BiasTensors.of(((6, 1.0),))])


def test_sampler_applies_penalties_to_the_right_sources():
    # Token 0 leads; a penalty on prompt tokens (repetition) or output tokens (presence) hands
    # the argmax to token 1. Presence ignores the prompt, per OpenAI.
    logits = torch.tensor([[3.0, 2.5, 0.0]] * 3)
    params = [SamplingParams(temperature=0.0, repetition_penalty=2.0),
              SamplingParams(temperature=0.0, presence_penalty=1.0),
              SamplingParams(temperature=0.0, presence_penalty=1.0)]
    meta = make_meta(params, prompt_ids=[[0], [0], []], output_ids=[[], [], [0]])
    assert sampler(logits, meta).token_ids.tolist() == [1, 0, 1]


def test_logit_bias_bans_and_forces_tokens():
    torch.manual_seed(0)
    logits = random_logits(512, 50, seed=3, scale=1.0)
    top = logits.argmax(dim=-1)
    banned = [SamplingParams(temperature=0.0, logit_bias=((int(t), -100.0),)) for t in top]
    assert not (sample(logits, banned) == top).any()
    everyone_bans_7 = [SamplingParams(logit_bias=((7, -100.0),))] * 512
    assert 7 not in sample(logits, everyone_bans_7).tolist()
    everyone_forces_7 = [SamplingParams(temperature=1.5, logit_bias=((7, 100.0),))] * 512
    assert set(sample(logits, everyone_forces_7).tolist()) == {7}


def test_sampler_leaves_input_logits_untouched():
    logits = random_logits(2, 100, seed=4)
    before = logits.clone()
    params = [SamplingParams(repetition_penalty=1.5, frequency_penalty=1.0, logit_bias=((3, 5.0),))] * 2
    sampler(logits, make_meta(params, prompt_ids=[[1, 2]] * 2, output_ids=[[3, 3]] * 2))
    assert torch.equal(logits, before)


def processed(logits, params, prompt_ids, output_ids, eos_token_ids=None) -> torch.Tensor:
    from lmserve.sampling.sampler import _apply_processors

    meta = SamplingMetadata(params=params, prompt_ids=prompt_ids, output_ids=output_ids,
                            generators=[None] * len(params), eos_token_ids=eos_token_ids)
    return _apply_processors(logits, meta)


@pytest.mark.parametrize("window, expected", [
    (0, [1.0, 1.0, 1.0, 1.0, -1.0, 1.0]),  # all of prompt + output
    (3, [2.0, 1.0, 1.0, 1.0, -1.0, 1.0]),  # 1 (prompt), 2, 3 (output)
    (1, [2.0, 2.0, 2.0, 1.0, -1.0, 1.0]),  # 3 only
    (9, [1.0, 1.0, 1.0, 1.0, -1.0, 1.0]),  # longer than the history
])
def test_repetition_window_penalises_only_the_last_tokens(window, expected):
    logits = torch.tensor([[2.0, 2.0, 2.0, 2.0, -1.0, 1.0]])
    p = SamplingParams(repetition_penalty=2.0, repetition_window=window)
    assert processed(logits, [p], [[0, 1]], [[2, 3]])[0].tolist() == expected


def test_unpenalized_ids_keep_their_logits_through_every_penalty():
    logits = BASE[:1].expand(2, -1).contiguous()  # [2.0, -1.0, 0.5, -0.25, 3.0, 0.0] twice
    p = SamplingParams(repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25,
                       unpenalized_ids=(0, 3), logit_bias=((3, 1.0),))
    got = processed(logits, [p, replace(p, unpenalized_ids=())], [[0, 3]] * 2, [[0, 0, 3, 4]] * 2)
    assert got[0].tolist() == [2.0, -1.0, 0.5, -0.25 + 1.0, 3.0 / 2 - 0.75, 0.0]  # bias is no penalty
    assert got[1].tolist() == [2.0 / 2 - 1.0, -1.0, 0.5, -0.25 * 2 - 0.75 + 1.0, 3.0 / 2 - 0.75, 0.0]
    assert torch.equal(logits, BASE[:1].expand(2, -1))


def test_unpenalized_ids_outside_the_vocabulary_are_refused():
    p = SamplingParams(repetition_penalty=2.0, unpenalized_ids=(6,))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        processed(BASE[:1].clone(), [p], [[1]], [[]])


def test_min_tokens_bans_eos_and_stop_ids_until_enough_are_out():
    logits = torch.zeros(4, 6)
    params = [SamplingParams(min_tokens=3, stop_token_ids=(4,)),
              SamplingParams(min_tokens=2, stop_token_ids=(4,)),  # 2 out: done
              SamplingParams(min_tokens=3, stop_token_ids=(4,), ignore_eos=True),  # eos does not stop anyway
              SamplingParams(min_tokens=3)]
    got = processed(logits, params, [[1]] * 4, [[1, 2]] * 4, eos_token_ids=[frozenset({5, 0})] * 4)
    banned = [[i for i, v in enumerate(row) if v == -math.inf] for row in got.tolist()]
    assert banned == [[0, 4, 5], [], [4], [0, 5]]


def test_min_tokens_moves_a_greedy_pick_off_eos():
    logits = torch.tensor([[0.0, 1.0, 3.0]])
    p = SamplingParams(temperature=0.0, min_tokens=1)
    meta = SamplingMetadata(params=[p], prompt_ids=[[0]], output_ids=[[]], generators=[None],
                            eos_token_ids=[frozenset({2})])
    assert sampler(logits, meta).token_ids.tolist() == [1]
    meta.output_ids = [[1]]
    assert sampler(logits, meta).token_ids.tolist() == [2]


# ---- seeds ---------------------------------------------------------------------------------

SEEDED = [SamplingParams(temperature=0.9, top_p=0.9, seed=42),
          SamplingParams(temperature=0.7, top_k=20, top_p=0.95, seed=42),
          SamplingParams(temperature=1.2, min_p=0.05, top_p=0.5, seed=7)]
OTHERS = [SamplingParams(), SamplingParams(temperature=0.0), SamplingParams(top_p=0.3),
          SamplingParams(top_k=50, seed=1), SamplingParams(min_p=0.1, top_p=0.1, seed=3)]


def tied_logits(vocab_size: int, seed: int) -> torch.Tensor:
    """(1, V) logits on a coarse grid, so many tie, as with bf16 model outputs."""
    return torch.round(random_logits(1, vocab_size, seed, scale=2.0) * 4) / 4


def seeded_run(params: SamplingParams, num_steps: int, batch_of) -> list[int]:
    """Tokens of one seeded row over `num_steps`; `batch_of(step)` gives (others, position)."""
    generator = torch.Generator().manual_seed(params.seed)
    tokens = []
    for step in range(num_steps):
        row_logits = tied_logits(2000, seed=100 + step)
        others, position = batch_of(step)
        rows = [tied_logits(2000, seed=1000 * step + i) for i in range(len(others))]
        rows.insert(position, row_logits)
        batch_params = list(others)
        batch_params.insert(position, params)
        gens = [torch.Generator().manual_seed(p.seed) if p.seed is not None else None for p in others]
        gens.insert(position, generator)
        out = sampler(torch.cat(rows), make_meta(batch_params, generators=gens))
        tokens.append(out.token_ids[position].item())
    return tokens


@pytest.mark.parametrize("params", SEEDED, ids=["top_p", "top_k+top_p", "min_p+top_p"])
def test_seeded_row_is_independent_of_its_batch(params):
    torch.manual_seed(0)
    alone = seeded_run(params, 20, lambda step: ([], 0))

    def crowded(step):
        others = [OTHERS[(step + i) % len(OTHERS)] for i in range(step % 6)]
        return others, step % (len(others) + 1)

    assert seeded_run(params, 20, crowded) == alone
    assert len(set(alone)) > 1  # the row really samples


def test_different_seeds_give_different_sequences():
    runs = [seeded_run(SamplingParams(seed=s), 20, lambda step: ([], 0)) for s in (1, 2)]
    assert runs[0] != runs[1]


# ---- frequencies ---------------------------------------------------------------------------


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=1.0),
    SamplingParams(temperature=0.5),
    SamplingParams(temperature=1.0, top_k=8),
    SamplingParams(temperature=1.0, top_p=0.999),
])
def test_unseeded_frequencies_match_softmax(params):
    torch.manual_seed(1234)
    logits = torch.tensor([1.0, 0.5, 0.0, -0.5, 2.0, -1.0, 0.25, 1.5])
    num_draws = 20000
    tokens = sample(logits.expand(num_draws, -1).contiguous(), [params] * num_draws)
    counts = torch.bincount(tokens, minlength=8).double()
    probs = (logits / params.temperature).double().softmax(dim=-1)
    # 7 degrees of freedom: 24.3 is the 99.9% quantile; the fixed seed keeps it deterministic.
    assert chi_square(counts, probs) < 24.3


def reference_probs(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """(V,) float64 target distribution by sort-and-cut: temperature, min_p, top_k, top_p."""
    probs = (logits.double() / p.temperature).softmax(dim=-1)
    probs = torch.where(probs >= p.min_p * probs.max(), probs, 0.0)
    sorted_probs, order = probs.sort(descending=True)
    if p.top_k:
        sorted_probs[p.top_k:] = 0.0
    sorted_probs /= sorted_probs.sum()
    before = sorted_probs.cumsum(0) - sorted_probs  # mass strictly before each token
    sorted_probs = torch.where(before < p.top_p, sorted_probs, 0.0)
    return torch.zeros_like(probs).scatter_(0, order, sorted_probs / sorted_probs.sum())


@pytest.mark.parametrize("params", [
    SamplingParams(top_p=0.5),
    SamplingParams(temperature=0.7, top_p=0.3),
    SamplingParams(temperature=1.3, top_k=12, top_p=0.8),
    SamplingParams(min_p=0.1, top_p=0.6),
    SamplingParams(temperature=0.9, min_p=0.05, top_k=20),
], ids=["top_p", "T+top_p", "T+top_k+top_p", "min_p+top_p", "T+min_p+top_k"])
def test_frequencies_match_sort_and_cut_reference(params):
    # A flat 40-token distribution: many draws are rejected and redrawn more than once.
    torch.manual_seed(7)
    logits = random_logits(1, 40, seed=8, scale=1.0)[0]
    num_draws = 20000
    tokens = sample(logits.expand(num_draws, -1).contiguous(), [params] * num_draws)
    counts = torch.bincount(tokens, minlength=40).double()
    expected = reference_probs(logits, params)
    inside = expected > 0
    assert counts[~inside].sum() == 0
    dof = int(inside.sum()) - 1
    # Wilson-Hilferty 99.9% quantile of chi-square with `dof` degrees of freedom.
    bound = dof * (1 - 2 / (9 * dof) + 3.09 * math.sqrt(2 / (9 * dof))) ** 3
    assert chi_square(counts[inside], expected[inside]) < bound


def test_nucleus_frequencies_are_renormalised_within_nucleus():
    torch.manual_seed(99)
    probs = torch.tensor([0.4, 0.25, 0.15, 0.1, 0.06, 0.04])
    num_draws = 20000
    tokens = sample(repeated(probs.tolist(), num_draws), [SamplingParams(top_p=0.75)] * num_draws)
    counts = torch.bincount(tokens, minlength=6).double()
    assert counts[3:].sum() == 0  # mass before token 3 is 0.8 >= 0.75
    nucleus = probs[:3].double() / probs[:3].sum()
    assert chi_square(counts[:3], nucleus) < 13.8  # 2 degrees of freedom, 99.9% quantile


# ---- logprobs ------------------------------------------------------------------------------


def test_logprobs_are_of_the_raw_distribution():
    torch.manual_seed(0)
    logits = random_logits(4, 300, seed=5)
    params = [SamplingParams(temperature=0.7, top_p=0.9, repetition_penalty=1.3, logprobs=5),
              SamplingParams(temperature=0.0, logit_bias=((1, 50.0),), logprobs=2),
              SamplingParams(),
              SamplingParams(top_k=3, logprobs=0)]
    out = sampler(logits, make_meta(params, prompt_ids=[[1, 2]] * 4))
    raw = logits.log_softmax(dim=-1)
    asked = [0, 1, 3]
    assert out.logprobs.shape == (4,) and out.logprobs.dtype == torch.float32
    assert out.top_ids.shape == (4, 5) and out.top_logprobs.shape == (4, 5)
    assert out.top_ids.dtype == torch.int64
    assert torch.equal(out.logprobs[asked], raw[asked].gather(1, out.token_ids[asked, None]).squeeze(1))
    top_logprobs, top_ids = raw.topk(5, dim=-1)
    assert torch.equal(out.top_ids[asked], top_ids[asked])
    assert torch.equal(out.top_logprobs[asked], top_logprobs[asked])
    assert (out.top_logprobs[asked].diff(dim=-1) <= 0).all()
    assert out.token_ids[1].item() == 1  # the bias moved the sample, not the logprobs


def test_no_logprobs_when_no_row_asks():
    out = sampler(random_logits(3, 50, seed=6), make_meta([SamplingParams()] * 3))
    assert out.logprobs is None and out.top_ids is None and out.top_logprobs is None
    assert to_sample_logprobs(out, [SamplingParams()] * 3) == [None, None, None]


def test_to_sample_logprobs_gives_each_row_its_own_count():
    logits = random_logits(4, 100, seed=7)
    params = [SamplingParams(logprobs=3), SamplingParams(), SamplingParams(logprobs=0),
              SamplingParams(temperature=0.0, logprobs=1)]
    out = sampler(logits, make_meta(params))
    result = to_sample_logprobs(out, params)
    assert result[1] is None
    assert [len(r.top) for r in (result[0], result[2], result[3])] == [3, 0, 1]
    raw = logits.log_softmax(dim=-1)
    greedy = result[3]
    assert greedy.sampled.token_id == greedy.top[0].token_id == int(logits[3].argmax())
    assert greedy.sampled.logprob == pytest.approx(float(raw[3].max()))
    assert all(isinstance(t.token_id, int) and isinstance(t.logprob, float) for t in result[0].top)
    assert math.isclose(sum(math.exp(t.logprob) for t in result[0].top),
                        float(raw[0].topk(3).values.exp().sum()), rel_tol=1e-6)


def test_rejects_logits_that_do_not_match_the_batch():
    with pytest.raises(ValueError):
        sampler(torch.zeros(2, 10), make_meta([SamplingParams()]))


@pytest.mark.parametrize("rows, cols", [(64, 49152), (3, 20), (5, 33), (50, 1000)])
def test_native_argmax_is_max_dims_first_index(rows, cols):
    """The compiled greedy argmax against torch.max(dim): random rows, ties (the first index wins),
    a NaN (it counts as the maximum, the first NaN wins), all -inf, +inf; widths below, at and
    past its 16-wide path with a tail."""
    from lmserve.kernels import native_module
    from lmserve.sampling.sampler import _argmax

    module = native_module()
    assert module is not None, "native kernels not built: run python -m lmserve.kernels"
    g = torch.Generator().manual_seed(rows * cols)
    x = torch.randn(rows, cols, generator=g)
    x[1] = torch.randint(0, 3, (cols,), generator=g).float()  # many ties at the maximum
    x[2, cols // 2] = float("nan")
    x[2, cols - 1] = float("nan")
    if rows > 3:
        x[3] = float("-inf")
    if rows > 4:
        x[4, cols - 1] = float("inf")
    expected = x.max(dim=-1).indices
    assert expected[2] == cols // 2
    assert torch.equal(module.argmax_rows(x), expected)
    assert torch.equal(_argmax(x), expected)
