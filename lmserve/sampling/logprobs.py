"""What a row reports about its step: the sampled token's logprob and the most likely
alternatives, from the raw model distribution or, under post_sampling_probs, from the
distribution the sampler chain left."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lmserve.request import SampleLogprobs, SamplingParams, TokenLogprob
from lmserve.sampling.draws import take_rows
from lmserve.sampling.metadata import SamplerOutput


@dataclass
class ChainLogprobs:
    """Logprobs of the chain's final distribution for some batch rows (post_sampling_probs)."""

    rows: list[int]  # batch rows
    sampled: torch.Tensor  # (r,) float32
    top_ids: torch.Tensor  # (r, K) int64, most likely first
    top_logprobs: torch.Tensor  # (r, K) float32, -inf past the tokens the chain kept


def batch_logprobs(raw: torch.Tensor, token_ids: torch.Tensor, params: list[SamplingParams],
                   chain: ChainLogprobs | None = None
                   ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Sampled-token logprob (B,) and top-K ids/logprobs (B, K): of log_softmax(raw logits),
    or taken from `chain` for its rows. Rows that did not ask hold zeros; all None when no row asked."""
    asked = [i for i, p in enumerate(params) if p.logprobs is not None]
    if not asked:
        return None, None, None
    num_top = max(params[i].logprobs for i in asked)
    chained = set(chain.rows) if chain is not None else set()
    raw_rows = [i for i in asked if i not in chained]
    if not chained and len(raw_rows) == len(params):
        return _raw_logprobs(raw, token_ids, raw_rows, num_top)
    out = (torch.zeros(len(params), device=raw.device),
           torch.zeros(len(params), num_top, dtype=torch.int64, device=raw.device),
           torch.zeros(len(params), num_top, device=raw.device))
    if raw_rows:
        _write_rows(out, raw_rows, _raw_logprobs(raw, token_ids, raw_rows, num_top))
    if chained:
        width = min(num_top, chain.top_ids.shape[1])
        _write_rows(out, chain.rows, (chain.sampled, chain.top_ids[:, :width], chain.top_logprobs[:, :width]))
    return out


def _raw_logprobs(raw: torch.Tensor, token_ids: torch.Tensor, rows: list[int], num_top: int):
    logprobs = take_rows(raw, rows).log_softmax(dim=-1)  # (n, V)
    index = torch.tensor(rows, device=raw.device)
    sampled = logprobs.gather(1, token_ids[index, None]).squeeze(1)  # (n,)
    top_logprobs, top_ids = logprobs.topk(num_top, dim=-1)  # (n, K) sorted descending
    return sampled, top_ids, top_logprobs


def _write_rows(out: tuple[torch.Tensor, ...], rows: list[int], values: tuple[torch.Tensor, ...]) -> None:
    """Write (n,) / (n, k) `values` into the (B,) / (B, K) `out` at `rows`; a narrower k leaves
    the rest of those rows at -inf, which to_sample_logprobs drops."""
    index = torch.tensor(rows, device=out[0].device)
    out[0][index] = values[0]
    if values[1].shape[1] < out[1].shape[1]:
        out[2][index] = -torch.inf
    out[1][index, : values[1].shape[1]] = values[1]
    out[2][index, : values[2].shape[1]] = values[2]


def to_sample_logprobs(out: SamplerOutput, params: list[SamplingParams]) -> list[SampleLogprobs | None]:
    """Host-side logprobs per row: None where `params[i].logprobs` is None, else the sampled
    token and its `params[i].logprobs` most likely alternatives. Copies each tensor once.

    Under post_sampling_probs each TokenLogprob also carries `prob`, its probability after the
    chain, and only tokens the chain kept are listed (llama.cpp drops zero probabilities)."""
    if out.logprobs is None:
        return [None] * len(params)
    token_ids, sampled = out.token_ids.tolist(), out.logprobs.tolist()
    top_ids, top_logprobs = out.top_ids.tolist(), out.top_logprobs.tolist()
    result: list[SampleLogprobs | None] = []
    for row, p in enumerate(params):
        if p.logprobs is None:
            result.append(None)
            continue
        top = zip(top_ids[row][: p.logprobs], top_logprobs[row][: p.logprobs])
        result.append(SampleLogprobs(_token(token_ids[row], sampled[row], p.post_sampling_probs),
                                     [_token(t, lp, p.post_sampling_probs) for t, lp in top if lp > -math.inf or not p.post_sampling_probs]))
    return result


def _token(token_id: int, logprob: float, post_sampling: bool) -> TokenLogprob:
    return TokenLogprob(token_id, logprob, math.exp(logprob) if post_sampling else None)
