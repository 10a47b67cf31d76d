"""Order statistics over latency samples."""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise


def percentile(values: Sequence[float], pct: float) -> float | None:
    """The `pct`-th percentile with linear interpolation between ranks (numpy's default).

    None for no samples, so a report says "no data" rather than a made-up zero.
    """
    if not 0 <= pct <= 100:
        raise ValueError(f"percentile must be in [0, 100], got {pct}")
    if not values:
        return None
    ordered = sorted(values)
    rank = pct / 100 * (len(ordered) - 1)
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def gaps(times: Sequence[float]) -> list[float]:
    """Differences between consecutive timestamps: the inter-token latencies of one stream."""
    return [later - earlier for earlier, later in pairwise(times)]
