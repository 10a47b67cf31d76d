"""What a row reports about its step: the sampled token's logprob and the most likely
alternatives, from the raw model distribution."""

from __future__ import annotations

import torch

from lmserve.request import SampleLogprobs, SamplingParams, TokenLogprob
from lmserve.sampling.draws import take_rows
from lmserve.sampling.metadata import SamplerOutput


def batch_logprobs(raw: torch.Tensor, token_ids: torch.Tensor, params: list[SamplingParams]
                   ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Sampled-token logprob (B,) and top-K ids/logprobs (B, K) of log_softmax(raw logits).

    Computed only for rows that asked; other rows hold zeros. All None when no row asked.
    """
    asked = [i for i, p in enumerate(params) if p.logprobs is not None]
    if not asked:
        return None, None, None
    num_top = max(params[i].logprobs for i in asked)
    logprobs = take_rows(raw, asked).log_softmax(dim=-1)  # (n, V)
    rows = torch.tensor(asked, device=raw.device)
    sampled = logprobs.gather(1, token_ids[rows, None]).squeeze(1)  # (n,)
    top_logprobs, top_ids = logprobs.topk(num_top, dim=-1)  # (n, K) sorted descending
    if len(asked) == len(params):
        return sampled, top_ids, top_logprobs
    return tuple(_scatter_rows(t, rows, len(params)) for t in (sampled, top_ids, top_logprobs))


def _scatter_rows(values: torch.Tensor, rows: torch.Tensor, num_rows: int) -> torch.Tensor:
    """A (num_rows, ...) zero tensor with `values` written at `rows`."""
    full = torch.zeros((num_rows, *values.shape[1:]), dtype=values.dtype, device=values.device)
    full[rows] = values
    return full


def to_sample_logprobs(out: SamplerOutput, params: list[SamplingParams]) -> list[SampleLogprobs | None]:
    """Host-side logprobs per row: None where `params[i].logprobs` is None, else the sampled
    token and its `params[i].logprobs` most likely alternatives. Copies each tensor once."""
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
        result.append(SampleLogprobs(TokenLogprob(token_ids[row], sampled[row]),
                                     [TokenLogprob(t, lp) for t, lp in top]))
    return result
