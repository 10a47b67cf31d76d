"""llama.cpp's sampler chain (SamplingParams.chain) against NumPy references written from the
algorithms' descriptions: llama.cpp's llama-sampler.cpp, typical sampling (Meister et al.),
Mirostat (Basu et al.), XTC and DRY (p-e-w), top-nσ (Tang et al.).

The chain's result is read through post_sampling_probs: with a vocabulary of at most 20 tokens
every surviving candidate is reported, with its renormalised probability."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from lmserve.request import DryPenalty, SamplerChain, SamplingParams
from lmserve.sampling import candidates
from lmserve.sampling.sampler import Sampler, SamplingMetadata, to_sample_logprobs

sampler = Sampler()
VOCAB = 16


def make_meta(params, prompt_ids=None, output_ids=None, generators=None, mus=None) -> SamplingMetadata:
    n = len(params)
    return SamplingMetadata(params=list(params), prompt_ids=prompt_ids or [[] for _ in range(n)],
                            output_ids=output_ids or [[] for _ in range(n)], generators=generators or [None] * n,
                            mirostat_mu=mus)


def random_logits(vocab_size: int, seed: int, scale: float = 2.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(vocab_size, generator=g) * scale  # (V,)


def chain_distribution(logits: torch.Tensor, params: SamplingParams, **meta) -> dict[int, float]:
    """token id -> probability after the chain, for one row of (V,) logits, V <= 20."""
    asked = replace(params, logprobs=len(logits), post_sampling_probs=True)
    out = sampler(logits[None], make_meta([asked], **meta))
    [reported] = to_sample_logprobs(out, [asked])
    assert reported.post_sampling and reported.sampled.token_id in {t.token_id for t in reported.top}
    return {t.token_id: t.prob for t in reported.top}


def survivors(logits: torch.Tensor, params: SamplingParams, **meta) -> dict[int, float]:
    """Like chain_distribution, for any vocabulary, when fewer than 20 tokens survive."""
    asked = replace(params, logprobs=20, post_sampling_probs=True)
    [reported] = to_sample_logprobs(sampler(logits[None], make_meta([asked], **meta)), [asked])
    assert len(reported.top) < 20
    return {t.token_id: t.prob for t in reported.top}


def assert_same_distribution(got: dict[int, float], expected: dict[int, float]) -> None:
    assert set(got) == set(expected)
    for token, prob in expected.items():
        assert got[token] == pytest.approx(prob, abs=1e-6), token


# ---- NumPy references: candidates are (ids, logits), sorted by logit, descending ----------


def ref_sorted(logits: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    values = logits.double().numpy()
    order = np.argsort(-values, kind="stable")
    return order, values[order]


def softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max())
    return e / e.sum()


def ref_top_k(ids, logits, k):
    return (ids, logits) if k <= 0 else (ids[:k], logits[:k])


def ref_top_p(ids, logits, p, min_keep):
    if p >= 1.0:
        return ids, logits
    mass = 0.0
    for i, prob in enumerate(softmax(logits)):
        mass += prob
        if mass >= p and i + 1 >= min_keep:
            return ids[: i + 1], logits[: i + 1]
    return ids, logits


def ref_min_p(ids, logits, p, min_keep):
    if p <= 0.0:
        return ids, logits
    passed = int((logits >= logits[0] + math.log(p)).sum())  # p_i >= min_p * p_max
    length = max(passed, min(min_keep, len(ids)))
    return ids[:length], logits[:length]


def ref_typical(ids, logits, p, min_keep):
    if p >= 1.0:
        return ids, logits
    probs = softmax(logits)
    entropy = -(probs * np.log(probs)).sum()
    ranking = np.argsort(np.abs(-np.log(probs) - entropy), kind="stable")
    mass, last = 0.0, len(ids)
    for i, index in enumerate(ranking):
        mass += probs[index]
        if mass > p and i + 1 >= min_keep:
            last = i + 1
            break
    kept = np.sort(ranking[:last])  # back to logit order
    return ids[kept], logits[kept]


def ref_xtc(ids, logits, threshold, min_keep):
    """XTC when its coin says yes (probability 1 in these tests)."""
    if threshold > 0.5 or len(ids) < 2:
        return ids, logits
    above = int((softmax(logits) >= threshold).sum())
    drop = max(above - 1, 0)
    if drop > 0 and len(ids) - drop >= min_keep:
        return ids[drop:], logits[drop:]
    return ids, logits


def ref_temperature(ids, logits, temperature, dynatemp_range=0.0, exponent=1.0):
    if dynatemp_range > 0.0:
        if len(ids) <= 1:
            return ids, logits
        probs = softmax(logits)
        normalized = -(probs * np.log(probs)).sum() / math.log(len(ids))
        low, high = max(0.0, temperature - dynatemp_range), temperature + dynatemp_range
        temperature = low + (high - low) * normalized ** exponent
    if temperature <= 0.0:
        return ids[:1], logits[:1]
    return ids, logits / temperature


def ref_top_n_sigma(ids, logits, n):
    if n <= 0.0 or len(ids) <= 1:
        return ids, logits
    keep = logits >= logits.max() - n * logits.std()  # population standard deviation
    return ids[keep], logits[keep]


def as_distribution(ids, logits) -> dict[int, float]:
    return {int(t): float(p) for t, p in zip(ids, softmax(logits))}


def ref_chain(logits: torch.Tensor, p: SamplingParams) -> dict[int, float]:
    """The chain without DRY or Mirostat, in p.chain.order, XTC's coin always yes."""
    chain = p.chain
    steps = {
        "top_k": lambda i, l: ref_top_k(i, l, p.top_k),
        "typ_p": lambda i, l: ref_typical(i, l, chain.typical_p, chain.min_keep),
        "top_p": lambda i, l: ref_top_p(i, l, p.top_p, chain.min_keep),
        "min_p": lambda i, l: ref_min_p(i, l, p.min_p, chain.min_keep),
        "xtc": lambda i, l: ref_xtc(i, l, chain.xtc_threshold, chain.min_keep) if chain.xtc_probability else (i, l),
        "temperature": lambda i, l: ref_temperature(i, l, p.temperature, chain.dynatemp_range, chain.dynatemp_exponent),
        "top_n_sigma": lambda i, l: ref_top_n_sigma(i, l, chain.top_n_sigma),
        "dry": lambda i, l: (i, l),  # no DryPenalty set: off
    }
    ids, values = ref_sorted(logits)
    for name in chain.order:
        ids, values = steps[name](ids, values)
        order = np.argsort(-values, kind="stable")
        ids, values = ids[order], values[order]
    return as_distribution(ids, values)


def only(name: str, **settings) -> SamplerChain:
    return SamplerChain(order=(name,), **settings)


# ---- each sampler alone, and in chains ----------------------------------------------------

SINGLE = [
    SamplingParams(top_k=5, chain=only("top_k")),
    SamplingParams(top_k=0, chain=only("top_k")),  # off
    SamplingParams(top_k=0, chain=only("top_k", min_keep=9)),  # off
    SamplingParams(top_k=3, chain=only("top_k", min_keep=9)),  # llama.cpp's top_k takes no min_keep
    SamplingParams(top_p=0.6, chain=only("top_p")),
    SamplingParams(top_p=0.6, chain=only("top_p", min_keep=7)),
    SamplingParams(min_p=0.2, chain=only("min_p")),
    SamplingParams(min_p=0.2, chain=only("min_p", min_keep=8)),
    SamplingParams(min_p=1.0, chain=only("min_p")),
    SamplingParams(chain=only("typ_p", typical_p=0.5)),
    SamplingParams(chain=only("typ_p", typical_p=0.2, min_keep=6)),
    SamplingParams(chain=only("typ_p", typical_p=1.0)),  # off
    SamplingParams(chain=only("xtc", xtc_probability=1.0, xtc_threshold=0.05)),
    SamplingParams(chain=only("xtc", xtc_probability=1.0, xtc_threshold=0.05, min_keep=14)),
    SamplingParams(chain=only("xtc", xtc_probability=1.0, xtc_threshold=0.51)),  # > 0.5: off
    SamplingParams(temperature=0.6, chain=only("temperature")),
    SamplingParams(temperature=1.4, chain=only("temperature", dynatemp_range=0.9, dynatemp_exponent=1.0)),
    SamplingParams(temperature=0.5, chain=only("temperature", dynatemp_range=0.8, dynatemp_exponent=2.5)),
    SamplingParams(chain=only("top_n_sigma", top_n_sigma=1.0)),
    SamplingParams(chain=only("top_n_sigma", top_n_sigma=0.3)),
    SamplingParams(chain=only("top_n_sigma", top_n_sigma=0.0)),  # off
]


@pytest.mark.parametrize("params", SINGLE, ids=lambda p: f"{p.chain.order[0]}")
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_each_sampler_matches_its_reference(params, seed):
    logits = random_logits(VOCAB, seed)
    assert_same_distribution(chain_distribution(logits, params), ref_chain(logits, params))


@pytest.mark.parametrize("params", [
    SamplingParams(top_k=10, top_p=0.9, min_p=0.05, temperature=0.8, chain=SamplerChain()),
    SamplingParams(top_k=12, top_p=0.95, min_p=0.02, temperature=1.3,
                   chain=SamplerChain(typical_p=0.9, top_n_sigma=2.0, xtc_probability=1.0, xtc_threshold=0.1)),
    SamplingParams(top_k=0, top_p=0.8, min_p=0.1, temperature=1.1,
                   chain=SamplerChain(dynatemp_range=0.5, min_keep=3, typical_p=0.95)),
    SamplingParams(top_k=8, top_p=0.7, temperature=2.0,
                   chain=SamplerChain(order=("temperature", "top_p", "top_k", "xtc"),
                                      xtc_probability=1.0, xtc_threshold=0.15)),
], ids=["default order", "every sampler", "dynatemp+min_keep", "temperature first"])
@pytest.mark.parametrize("seed", [3, 4])
def test_chains_match_the_reference_in_order(params, seed):
    logits = random_logits(VOCAB, seed)
    assert_same_distribution(chain_distribution(logits, params), ref_chain(logits, params))


@pytest.mark.parametrize("params", [
    SamplingParams(top_k=12, top_p=0.95, temperature=0.7, chain=SamplerChain()),
    SamplingParams(chain=SamplerChain(top_n_sigma=0.3)),
    SamplingParams(temperature=1.5, chain=SamplerChain(typical_p=0.5)),
    SamplingParams(temperature=0.0, chain=SamplerChain(dry=DryPenalty(3.0))),
], ids=["top_k", "top_n_sigma", "typ_p", "greedy"])
def test_large_vocabularies_sort_only_what_can_survive(params):
    # 4,000 tokens: the chain cuts before its sort and sorts by topk; the result must not change.
    logits = random_logits(4000, 13, scale=3.0)
    logits[:8] = 20.0 - 0.3 * torch.arange(8)  # a few likely tokens: the cuts keep some of them
    got = survivors(logits, params)
    assert len(got) > 1 or params.greedy
    assert_same_distribution(got, ref_chain(logits, params))


def test_large_vocabulary_mirostat_2_cuts_before_sorting():
    logits = random_logits(4000, 14, scale=3.0)
    p = SamplingParams(temperature=0.8, chain=SamplerChain(mirostat=2, mirostat_tau=1.5))
    ids, probs = ref_mirostat(logits, 0.8, 3.0, 2)
    assert 1 < len(ids) < 20
    assert_same_distribution(survivors(logits, p), as_distribution(ids, np.log(probs)))


def test_order_changes_what_min_p_keeps():
    # min_p after a high temperature sees a flatter distribution, so it keeps more tokens.
    logits = random_logits(VOCAB, 5)
    before = SamplingParams(temperature=3.0, min_p=0.3, chain=SamplerChain(order=("min_p", "temperature")))
    after = replace(before, chain=SamplerChain(order=("temperature", "min_p")))
    kept_before, kept_after = chain_distribution(logits, before), chain_distribution(logits, after)
    assert len(kept_before) < len(kept_after)
    assert_same_distribution(kept_before, ref_chain(logits, before))
    assert_same_distribution(kept_after, ref_chain(logits, after))


def test_order_changes_top_k_then_top_p():
    # top_p over the renormalised top 2 keeps one token; over the whole distribution, more.
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    k_first = SamplingParams(top_k=2, top_p=0.6, chain=SamplerChain(order=("top_k", "top_p")))
    p_first = replace(k_first, chain=SamplerChain(order=("top_p", "top_k")))
    assert set(chain_distribution(logits, k_first)) == {0}
    assert set(chain_distribution(logits, p_first)) == {0, 1}


@pytest.mark.parametrize("chain, params", [
    (only("top_p", min_keep=4), dict(top_p=0.01)),
    (only("min_p", min_keep=4), dict(min_p=0.99)),
    (only("typ_p", typical_p=0.01, min_keep=4), {}),
], ids=["top_p", "min_p", "typ_p"])
def test_min_keep_keeps_that_many(chain, params):
    logits = random_logits(VOCAB, 6, scale=4.0)
    p = SamplingParams(chain=chain, **params)
    assert len(chain_distribution(logits, p)) == 4
    assert len(chain_distribution(logits, replace(p, chain=replace(chain, min_keep=0)))) < 4


def test_xtc_keeps_min_keep_by_not_cutting():
    # XTC would leave 3 tokens; min_keep 4 means it does nothing, as in llama.cpp.
    logits = torch.tensor([0.3, 0.3, 0.3, 0.06, 0.04]).log()
    p = SamplingParams(chain=only("xtc", xtc_probability=1.0, xtc_threshold=0.2, min_keep=4))
    assert set(chain_distribution(logits, p)) == {0, 1, 2, 3, 4}
    assert set(chain_distribution(logits, replace(p, chain=replace(p.chain, min_keep=3)))) == {2, 3, 4}


def test_zero_temperature_inside_the_chain_keeps_only_the_top():
    c = candidates.Candidates.sort(torch.tensor([[0.5, 2.0, 1.0], [3.0, 1.0, 2.0]]))
    kept = candidates.temperature(c, [0.0, 2.0], [0.0, 0.0], [1.0, 1.0])
    assert kept.ids[0, 0] == 1 and kept.num_live().squeeze(1).tolist() == [1, 3]
    assert kept.logits[1].tolist() == [1.5, 1.0, 0.5]


def test_xtc_probability_is_the_chance_it_cuts():
    # With the top token at 0.5 and threshold 0.2, a cut removes it: its share of draws falls
    # from 0.5 to 0.5 * (1 - probability).
    torch.manual_seed(11)
    num_rows = 20000
    logits = torch.tensor([0.5, 0.3, 0.2]).log().expand(num_rows, -1).contiguous()
    p = SamplingParams(chain=only("xtc", xtc_probability=0.4, xtc_threshold=0.2))
    share = (sampler(logits, make_meta([p] * num_rows)).token_ids == 0).double().mean().item()
    assert share == pytest.approx(0.5 * 0.6, abs=0.015)


# ---- DRY -----------------------------------------------------------------------------------


def ref_dry(history, dry: DryPenalty, vocab_size: int, unpenalized=()) -> np.ndarray:
    """(V,) amounts DRY subtracts, naively: for every earlier position, how far the stretch
    ending there matches the end of the context (up to the last sequence breaker)."""
    tokens = list(history[-dry.window:]) if dry.window else list(history)
    amounts = np.zeros(vocab_size)
    n = len(tokens)
    if n <= dry.allowed_length:
        return amounts
    limit = n
    for distance in range(n):  # the last breaker, searched from the end, caps repeats
        head = n - 1 - distance
        tails = [len(b) - 1 for b in dry.breaker_ids if b[0] == tokens[head]
                 and len(b) - 1 <= distance and tuple(tokens[head + 1: head + len(b)]) == tuple(b[1:])]
        if tails:
            limit = distance - max(tails)
            break
    if limit < dry.allowed_length:
        return amounts
    longest: dict[int, int] = {}
    for end in range(n - 1):
        length = 0
        while length <= end and tokens[end - length] == tokens[n - 1 - length]:
            length += 1
        length = min(length, limit)
        if length >= dry.allowed_length:
            longest[tokens[end + 1]] = max(longest.get(tokens[end + 1], 0), length)
    single_breakers = {b[0] for b in dry.breaker_ids if len(b) == 1}
    for token, length in longest.items():
        if token not in single_breakers and token not in unpenalized:
            amounts[token] = dry.multiplier * dry.base ** (length - dry.allowed_length)
    return amounts


def dry_distribution(history, dry: DryPenalty, unpenalized=()) -> dict[int, float]:
    logits = random_logits(10, 7)
    p = SamplingParams(chain=SamplerChain(order=("dry",), dry=dry), unpenalized_ids=tuple(unpenalized))
    got = chain_distribution(logits, p, prompt_ids=[list(history[:3])], output_ids=[list(history[3:])])
    expected = softmax(logits.double().numpy() - ref_dry(history, dry, 10, unpenalized))
    assert_same_distribution(got, {t: float(q) for t, q in enumerate(expected)})
    return got


def dry_amounts(history, dry: DryPenalty, unpenalized=()) -> dict[int, float]:
    """What the chain subtracted, read back from its distribution against the raw one."""
    assert 9 not in history  # token 9 is never penalised: the softmax's common shift is read from it
    got = dry_distribution(history, dry, unpenalized)
    raw = softmax(random_logits(10, 7).double().numpy())
    shift = math.log(got[9] / raw[9])
    return {t: round(-(math.log(got[t] / raw[t]) - shift), 5) for t in got
            if abs(math.log(got[t] / raw[t]) - shift) > 1e-5}


def test_dry_penalises_the_token_that_would_extend_a_repeat():
    # "1 2 3" ends the context and occurred before, followed by 4: 4 loses 1.0 * 2 ** (3 - 2).
    history = [1, 2, 3, 4, 1, 2, 3]
    assert dry_amounts(history, DryPenalty(1.0, base=2.0, allowed_length=2)) == {4: 2.0}
    assert dry_amounts(history, DryPenalty(1.0, base=2.0, allowed_length=3)) == {4: 1.0}
    assert dry_amounts(history, DryPenalty(0.5, base=3.0, allowed_length=1)) == {4: 4.5}
    assert dry_amounts(history, DryPenalty(1.0, base=2.0, allowed_length=4)) == {}


@pytest.mark.parametrize("breakers, expected", [
    (((9,),), {4: 2.0}),  # absent: no effect
    (((2,),), {}),  # a breaker one token from the end: repeats may be 1 long, under allowed_length
    (((4,),), {}),  # 4 is a single-token breaker: never penalised itself
    (((1, 2),), {}),  # two-token breaker "1 2" two tokens from the end
    (((1, 5),), {4: 2.0}),  # "1 5" does not occur
], ids=["absent", "near the end", "breaker token", "two-token", "two-token absent"])
def test_dry_sequence_breakers(breakers, expected):
    history = [1, 2, 3, 4, 1, 2, 3]
    assert dry_amounts(history, DryPenalty(1.0, base=2.0, allowed_length=2, breaker_ids=breakers)) == expected


def test_dry_window_limits_what_is_scanned():
    history = [1, 2, 3, 4, 5, 6, 0, 1, 2, 3]
    assert dry_amounts(history, DryPenalty(1.0, base=2.0, allowed_length=2, window=0)) == {4: 2.0}
    assert dry_amounts(history, DryPenalty(1.0, base=2.0, allowed_length=2, window=10)) == {4: 2.0}
    assert dry_amounts(history, DryPenalty(1.0, base=2.0, allowed_length=2, window=9)) == {4: 1.0}  # "2 3" only
    assert dry_amounts(history, DryPenalty(1.0, base=2.0, allowed_length=2, window=8)) == {}


def test_dry_takes_the_longest_repeat_and_skips_unpenalized_ids():
    # After "... 5 6": "5 6" recurs before 7 (length 2) and "4 5 6" before 8 (length 3).
    history = [5, 6, 7, 4, 5, 6, 8, 4, 5, 6]
    dry = DryPenalty(1.5, base=2.0, allowed_length=2)
    assert dry_amounts(history, dry) == {7: 1.5, 8: 3.0}
    assert dry_amounts(history, dry, unpenalized=[8]) == {7: 1.5}


@pytest.mark.parametrize("seed", range(6))
def test_dry_matches_the_reference_on_random_histories(seed):
    rng = np.random.default_rng(seed)
    history = rng.integers(0, 4, size=40).tolist()  # a small alphabet repeats a lot
    breakers = ((int(rng.integers(0, 4)),), (1, 2)) if seed % 2 else ()
    dry_distribution(history, DryPenalty(0.8, base=1.75, allowed_length=2, window=30, breaker_ids=breakers))


def test_dry_later_in_the_order_applies_to_the_candidates_left():
    history = [1, 2, 3, 4, 1, 2, 3]
    logits = torch.tensor([0.0, 0.0, 0.0, 0.0, 3.0, 1.0, -1.0, 0.5, 0.2, 0.1])
    dry = DryPenalty(2.0, base=2.0, allowed_length=2)  # token 4 loses 4.0: from first to last
    p = SamplingParams(top_k=3, chain=SamplerChain(order=("top_k", "dry"), dry=dry))
    got = chain_distribution(logits, p, prompt_ids=[history], output_ids=[[]])
    assert_same_distribution(got, as_distribution(np.array([4, 5, 7]), np.array([-1.0, 1.0, 0.5])))


# ---- Mirostat ------------------------------------------------------------------------------


def ref_mirostat(logits: torch.Tensor, temperature: float, mu: float, version: int) -> tuple[np.ndarray, np.ndarray]:
    """The candidates Mirostat (after plain temperature) keeps, and their probabilities."""
    ids, values = ref_sorted(logits)
    values = values / temperature
    probs = softmax(values)
    if version == 1:
        m, n = 100, len(ids)
        pairs = range(min(m - 1, n - 1))
        t = np.array([math.log((i + 2) / (i + 1)) for i in pairs])
        b = np.array([math.log(probs[i] / probs[i + 1]) for i in pairs])
        s_hat = (t * b).sum() / (t * t).sum()
        epsilon = s_hat - 1
        k = ((epsilon * 2 ** mu) / (1 - len(logits) ** -epsilon)) ** (1 / s_hat)
        length = min(max(int(k), 1), n)
    else:
        surprise = -np.log2(probs)
        length = max(int(np.argmax(surprise > mu)) if (surprise > mu).any() else len(ids), 1)
    return ids[:length], softmax(values[:length])


@pytest.mark.parametrize("version, tau", [(1, 2.0), (2, 2.5)])
def test_mirostat_mu_evolves_as_the_reference(version, tau):
    eta, temperature = 0.3, 0.9
    p = SamplingParams(temperature=temperature, logprobs=20, post_sampling_probs=True,
                       chain=SamplerChain(mirostat=version, mirostat_tau=tau, mirostat_eta=eta))
    mu, cut = None, 0
    for step in range(8):
        ranks = torch.arange(1, 21, dtype=torch.float64)
        logits = (-1.2 * ranks.log() + 0.3 * random_logits(20, 100 + step).double()).float()  # Zipf-like
        out = sampler(logits[None], make_meta([p], mus=[mu]))
        [reported] = to_sample_logprobs(out, [p])
        ids, probs = ref_mirostat(logits, temperature, 2 * tau if mu is None else mu, version)
        assert_same_distribution({t.token_id: t.prob for t in reported.top}, as_distribution(ids, np.log(probs)))
        chosen = float(probs[list(ids).index(reported.sampled.token_id)])
        expected_mu = (2 * tau if mu is None else mu) - eta * (-math.log2(chosen) - tau)
        assert out.mirostat_mu[0] == pytest.approx(expected_mu, abs=1e-6)
        mu, cut = out.mirostat_mu[0], cut + (len(ids) < 20)
    assert cut >= 3  # Mirostat really truncated on most steps


def test_mirostat_replaces_the_truncating_samplers():
    logits = random_logits(VOCAB, 8)
    chain = SamplerChain(mirostat=2, mirostat_tau=3.0, typical_p=0.2, xtc_probability=1.0)
    got = chain_distribution(logits, SamplingParams(top_k=1, temperature=1.0, chain=chain))
    ids, probs = ref_mirostat(logits, 1.0, 6.0, 2)
    assert len(got) > 1
    assert_same_distribution(got, as_distribution(ids, np.log(probs)))


def test_rows_without_mirostat_report_no_mu():
    out = sampler(random_logits(VOCAB, 9)[None].expand(2, -1).contiguous(),
                  make_meta([SamplingParams(chain=SamplerChain()), SamplingParams(chain=SamplerChain(mirostat=1))]))
    assert out.mirostat_mu[0] is None and isinstance(out.mirostat_mu[1], float)
    assert sampler(random_logits(VOCAB, 9)[None], make_meta([SamplingParams()])).mirostat_mu is None


# ---- greedy, seeds, frequencies, mixed batches ---------------------------------------------

CHAINS = [SamplingParams(top_k=20, chain=SamplerChain(xtc_probability=0.5, xtc_threshold=0.05), seed=5),
          SamplingParams(chain=SamplerChain(mirostat=2), seed=6),
          SamplingParams(temperature=0.8, min_p=0.02, chain=SamplerChain(typical_p=0.9, dynatemp_range=0.3), seed=7)]
NEIGHBOURS = [SamplingParams(), SamplingParams(temperature=0.0), SamplingParams(top_p=0.3, seed=1),
              SamplingParams(chain=SamplerChain(xtc_probability=1.0)), SamplingParams(chain=SamplerChain(mirostat=1)),
              SamplingParams(temperature=0.0, chain=SamplerChain(top_n_sigma=0.1))]


def seeded_tokens(params: SamplingParams, neighbours: list[SamplingParams], steps: int = 12) -> list[int]:
    generator = torch.Generator().manual_seed(params.seed)
    mu, tokens = None, []
    for step in range(steps):
        batch = [params, *neighbours[: step % (len(neighbours) + 1)]]
        position = step % len(batch)
        batch.insert(position, batch.pop(0))
        logits = torch.stack([random_logits(300, 1000 * step + i, scale=1.5) for i in range(len(batch))])
        logits[position] = random_logits(300, step, scale=1.5)
        gens = [generator if b is params else None for b in batch]
        mus = [mu if b is params else None for b in batch]
        out = sampler(logits, make_meta(batch, generators=gens, mus=mus))
        tokens.append(int(out.token_ids[position]))
        mu = None if out.mirostat_mu is None else out.mirostat_mu[position]
    return tokens


@pytest.mark.parametrize("params", CHAINS, ids=["xtc", "mirostat", "typical+dynatemp"])
def test_seeded_chain_rows_are_reproducible_in_mixed_batches(params):
    torch.manual_seed(0)
    alone = seeded_tokens(params, [])
    assert seeded_tokens(params, NEIGHBOURS) == alone
    assert len(set(alone)) > 3  # it really samples


def test_greedy_rows_stay_argmax_beside_chain_rows():
    logits = torch.stack([random_logits(300, i) for i in range(6)])
    params = [SamplingParams(temperature=0.0), SamplingParams(chain=SamplerChain(mirostat=2)),
              SamplingParams(temperature=0.0, chain=SamplerChain(top_n_sigma=0.5, xtc_probability=1.0)),
              SamplingParams(temperature=0.0, logprobs=2, post_sampling_probs=True),
              SamplingParams(top_k=3, chain=SamplerChain()), SamplingParams(temperature=0.0, repetition_penalty=1.0)]
    out = sampler(logits, make_meta(params))
    greedy = [0, 2, 3, 5]
    assert out.token_ids[greedy].tolist() == logits[greedy].argmax(dim=-1).tolist()
    reported = to_sample_logprobs(out, params)[3]
    assert reported.sampled.prob == 1.0 and [t.prob for t in reported.top] == [1.0]


def test_greedy_chain_row_takes_the_argmax_after_dry():
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0, 2.0, 1.5]])
    dry = DryPenalty(1.0, base=2.0, allowed_length=2)  # token 4 loses 2.0
    p = SamplingParams(temperature=0.0, chain=SamplerChain(dry=dry))
    assert sampler(logits, make_meta([p], prompt_ids=[[1, 2, 3, 4, 1, 2, 3]])).token_ids.tolist() == [5]
    assert sampler(logits, make_meta([p], prompt_ids=[[1, 2, 3]])).token_ids.tolist() == [4]


@pytest.mark.parametrize("params", [
    SamplingParams(top_k=6, top_p=0.9, min_p=0.05, chain=SamplerChain()),
    SamplingParams(temperature=1.2, chain=SamplerChain(typical_p=0.8, dynatemp_range=0.4)),
    SamplingParams(chain=SamplerChain(mirostat=2, mirostat_tau=2.5)),
], ids=["default", "typical+dynatemp", "mirostat 2"])
def test_draws_follow_the_distribution_the_chain_reports(params):
    # The one place exactness is impossible: the draw itself, by frequency (chi-square, 99.9%).
    torch.manual_seed(21)
    logits = random_logits(VOCAB, 10, scale=1.0)
    expected = chain_distribution(logits, params)
    assert len(expected) >= 4
    num_draws = 20000
    tokens = sampler(logits.expand(num_draws, -1).contiguous(), make_meta([params] * num_draws)).token_ids
    counts = torch.bincount(tokens, minlength=VOCAB).double()
    assert counts[[t for t in range(VOCAB) if t not in expected]].sum() == 0
    probs = torch.tensor([expected[t] for t in sorted(expected)], dtype=torch.float64)
    observed = counts[sorted(expected)]
    chi_square = float(((observed - probs * num_draws) ** 2 / (probs * num_draws)).sum())
    dof = len(expected) - 1
    assert chi_square < dof * (1 - 2 / (9 * dof) + 3.09 * math.sqrt(2 / (9 * dof))) ** 3


# ---- post_sampling_probs -------------------------------------------------------------------


def test_post_sampling_probs_without_a_chain_reports_the_fast_paths_distribution():
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    p = SamplingParams(temperature=1.0, min_p=0.2, top_p=0.7, logprobs=4, post_sampling_probs=True)
    [reported] = to_sample_logprobs(sampler(logits[None], make_meta([p])), [p])
    assert reported.post_sampling
    assert [(t.token_id, round(t.prob, 6)) for t in reported.top] == [(0, 0.625), (1, 0.375)]
    assert all(t.logprob == pytest.approx(math.log(t.prob)) for t in reported.top)
    raw = replace(p, post_sampling_probs=False)
    [plain] = to_sample_logprobs(sampler(logits[None], make_meta([raw])), [raw])
    assert not plain.post_sampling and len(plain.top) == 4 and plain.top[0].prob is None
    assert plain.top[0].logprob == pytest.approx(math.log(0.5))


def test_post_sampling_rows_and_raw_rows_share_a_batch():
    logits = torch.stack([random_logits(VOCAB, 12)] * 3)
    params = [SamplingParams(top_k=2, logprobs=5, post_sampling_probs=True, chain=SamplerChain()),
              SamplingParams(logprobs=3), SamplingParams(top_k=3, logprobs=1, post_sampling_probs=True)]
    result = to_sample_logprobs(sampler(logits, make_meta(params)), params)
    assert len(result[0].top) == 2 and sum(t.prob for t in result[0].top) == pytest.approx(1.0)
    assert [t.token_id for t in result[1].top] == logits[1].topk(3).indices.tolist()
    assert result[1].top[0].logprob == pytest.approx(float(logits[1].log_softmax(-1).max()))
    assert len(result[2].top) == 1 and result[2].top[0].prob > 1 / 3
