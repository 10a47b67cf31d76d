"""Speculation under sampling keeps the sampling distribution: thousands of 4-token continuations
drawn with drafts (fixed seed; from prompt lookup or a draft model) against the exact distribution
transformers gives for the same tiny model, by chi-square goodness of fit on each position and
each pair of neighbours. Most continuations here take drafts and many keep some, so the later
positions mostly come from drafts' rows."""

from __future__ import annotations

import math
from collections import Counter
from itertools import product

import pytest
import torch

from lmserve.request import SamplingParams
from tests.helpers.real_engine import tiny_engine
from tests.helpers.tiny_models import save_hf_folder, tiny_hf_model

VOCAB = 12
NUM_TOKENS = 4
SAMPLES = 4000


@pytest.fixture(scope="module")
def peaked(tmp_path_factory):
    """A tiny random model whose distributions are peaked (scaled output head), and a prompt of its
    own greedy text, which repeats: drafts are found at most steps and often kept."""
    model = tiny_hf_model("llama", vocab_size=VOCAB, seed=1)
    with torch.no_grad():
        model.lm_head.weight.mul_(10.0)
        prompt = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=21, do_sample=False)[0].tolist()
    return model, save_hf_folder(model, tmp_path_factory.mktemp("peaked")), prompt


def warp(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The sampling distribution (..., V): softmax at the temperature, then the nucleus (a token
    stays when the tokens strictly likelier than it hold less than top_p), renormalised."""
    probs = torch.softmax(logits.double() / params.temperature, dim=-1)
    likelier = (probs[..., None, :] * (probs[..., None, :] > probs[..., :, None])).sum(-1)  # (..., V)
    kept = probs * (likelier < params.top_p)
    return kept / kept.sum(-1, keepdim=True)


def exact_distribution(model, prompt: list[int], params: SamplingParams) -> dict[tuple[int, ...], float]:
    """Probability of every NUM_TOKENS-token continuation, from one batched forward."""
    heads = list(product(range(VOCAB), repeat=NUM_TOKENS - 1))
    with torch.no_grad():
        logits = model(torch.tensor([prompt + list(h) for h in heads])).logits[:, len(prompt) - 1:]  # (H, 4, V)
    probs = warp(logits, params)
    exact = {}
    for row, head in enumerate(heads):
        p_head = math.prod(probs[row, i, t].item() for i, t in enumerate(head))
        for last in range(VOCAB):
            exact[head + (last,)] = p_head * probs[row, -1, last].item()
    return exact


def sample(engine, prompt: list[int], params: SamplingParams) -> list[tuple[int, ...]]:
    torch.manual_seed(0)
    outputs = []
    for batch in range(SAMPLES // 4):  # four at a time: speculation serves at most four running
        tokens = {}
        for i in range(4):
            engine.add_request(f"{batch}-{i}", prompt, params)
        while engine.has_unfinished:
            for out in engine.step().outputs:
                tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
        outputs += [tuple(t) for t in tokens.values()]
    return outputs


def chi_square(observed: Counter, expected: dict, total: int) -> tuple[float, int]:
    """Pearson's statistic and degrees of freedom; cells expecting fewer than 5 are pooled."""
    cells, pooled_obs, pooled_exp = [], 0, 0.0
    for key, p in expected.items():
        if p * total >= 5:
            cells.append((observed.get(key, 0), p * total))
        else:
            pooled_obs, pooled_exp = pooled_obs + observed.get(key, 0), pooled_exp + p * total
    if pooled_exp > 0:
        cells.append((pooled_obs, pooled_exp))
    return sum((o - e) ** 2 / e for o, e in cells), len(cells) - 1


def critical(df: int, z: float = 3.09) -> float:
    """The chi-square quantile at 1 - 0.001 (z = 3.09), by Wilson and Hilferty's approximation."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def marginal(exact: dict, positions: tuple[int, ...]) -> dict:
    out: dict = {}
    for seq, p in exact.items():
        key = tuple(seq[i] for i in positions)
        out[key] = out.get(key, 0.0) + p
    return out


@pytest.mark.parametrize("drafts", ["lookup", "draft model"])
@pytest.mark.parametrize("params", [
    SamplingParams(temperature=1.0, max_tokens=NUM_TOKENS, ignore_eos=True),
    SamplingParams(temperature=0.8, top_p=0.9, max_tokens=NUM_TOKENS, ignore_eos=True),
], ids=["temperature", "top_p"])
def test_drafted_sampling_draws_from_the_model_distribution(peaked, params, drafts):
    """Drafts from prompt lookup, or from a draft model (the model itself: its greedy tokens)."""
    model, folder, prompt = peaked
    engine = tiny_engine(folder, speculative=3, speculative_sampling=True, num_blocks=256,
                         draft=folder if drafts == "draft model" else None)
    got = sample(engine, prompt, params)
    assert all(len(seq) == NUM_TOKENS for seq in got)
    assert engine.num_draft_tokens >= SAMPLES // 2 and engine.num_accepted_tokens >= SAMPLES // 4
    exact = exact_distribution(model, prompt, params)
    for positions in [(i,) for i in range(NUM_TOKENS)] + [(i, i + 1) for i in range(NUM_TOKENS - 1)]:
        observed = Counter(tuple(seq[i] for i in positions) for seq in got)
        statistic, df = chi_square(observed, marginal(exact, positions), len(got))
        assert statistic < critical(df), (positions, statistic, df)
