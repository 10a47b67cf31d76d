"""Small tensor helpers both sampling paths share: per-row uniforms, the inverse-CDF draw, and
row selection. A seeded row's numbers come from its own generator, so a seeded sequence is the
same whatever shares its batch."""

from __future__ import annotations

import torch

from lmserve.request import SamplingParams


def draw(weights: torch.Tensor, uniforms: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one index per row with probability proportional to `weights` (n, V), one uniform
    (n, 1) each; returns the indices (n, 1) and each row's total weight (n, 1).

    Inverse CDF: searchsorted(right=True) finds the first index whose cumulative sum exceeds
    the target, so a zero weight (cut or underflowed) is never chosen.
    """
    cdf = weights.cumsum(dim=-1)  # (n, V); CPU cumsum accumulates float32 in double
    total = cdf[:, -1:].clone()  # a copy, so the caller does not keep all of cdf alive
    # Keep the target strictly below the total, or rounding could step past the last token.
    target = torch.minimum(uniforms * total, torch.nextafter(total, torch.zeros_like(total)))
    choice = torch.searchsorted(cdf, target, right=True).clamp_(max=weights.shape[1] - 1)
    return choice, total


def uniforms(generators: list[torch.Generator | None], device: torch.device) -> torch.Tensor:
    """(n, 1) float32 uniforms in [0, 1): seeded rows from their own generator, one call each;
    the others from one batched draw of the global generator."""
    values = torch.rand(len(generators), 1, device=device)  # (n, 1)
    seeded = [i for i, g in enumerate(generators) if g is not None]
    if seeded:
        draws = [torch.rand(1, generator=generators[i], device=generators[i].device) for i in seeded]
        values[seeded] = torch.cat(draws).to(device)[:, None]
    return values


def column(params: list[SamplingParams], name: str, device: torch.device) -> torch.Tensor:
    """(n, 1) float32 tensor of one SamplingParams field, one entry per row."""
    return torch.tensor([float(getattr(p, name)) for p in params], device=device)[:, None]


def take_rows(x: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """x[rows], without a copy when rows is every row in order. index_select rather than
    x[rows]: advanced indexing is far slower on CPU for (n, V) rows."""
    if rows == list(range(x.shape[0])):
        return x
    return x.index_select(0, index(rows, x.device))


def index(rows: list[int], device: torch.device) -> torch.Tensor:
    """(n,) int64 row indices on `device`."""
    return torch.tensor(rows, dtype=torch.int64, device=device)
