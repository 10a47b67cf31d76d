"""Per-level summaries and the text tables printed for them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from bench.stats import gaps, mean, percentile

if TYPE_CHECKING:
    from bench.client import RequestResult
    from bench.workloads import Workload


@dataclass
class LevelReport:
    """One workload on one server. Seconds in `*_s`, rates in `*_tok_s`; None means no samples."""

    server: str
    workload: str
    kind: str
    concurrency: int
    num_requests: int
    prompt_tokens: int
    max_tokens: int
    shared_prefix_tokens: int
    wall_s: float
    output_tokens: int
    output_tok_s: float
    ttft_p50_s: float | None
    ttft_p95_s: float | None
    itl_p50_s: float | None  # gaps between content chunks, pooled over the level's requests
    itl_p95_s: float | None
    tpot_p50_s: float | None  # (last chunk - first chunk) / (tokens - 1), per request
    e2e_p50_s: float | None
    prefill_tok_s: float | None  # prompt tokens / TTFT p50: meaningful for the prefill workload
    prompt_tokens_reported: float | None  # mean of the servers' usage.prompt_tokens
    cached_tokens_mean: float | None  # mean of usage.prompt_tokens_details.cached_tokens
    num_errors: int
    first_error: str | None
    peak_rss_mib: float | None  # the server's processes' RSS summed (shared pages counted in each)
    peak_pss_mib: float | None = None  # their PSS summed (shared pages split between them)
    peak_hwm_mib: float | None = None  # their VmHWM summed: the kernel's peak, start-up and load included


def summarize_level(
    server: str, workload: Workload, results: Sequence[RequestResult], wall_s: float, peak_rss_bytes: int | None,
    peak_pss_bytes: int | None = None, peak_hwm_bytes: int | None = None,
) -> LevelReport:
    ok = [result for result in results if result.ok]
    errors = [result.error for result in results if not result.ok]
    ttfts = [result.ttft_s for result in ok if result.ttft_s is not None]
    itls = [gap for result in ok for gap in gaps(result.chunk_times_s)]
    output_tokens = sum(result.output_tokens for result in ok)
    ttft_p50 = percentile(ttfts, 50)
    return LevelReport(
        server=server, workload=workload.name, kind=workload.kind, concurrency=workload.concurrency,
        num_requests=len(results), prompt_tokens=workload.prompt_tokens, max_tokens=workload.max_tokens,
        shared_prefix_tokens=workload.shared_prefix_tokens, wall_s=wall_s, output_tokens=output_tokens,
        output_tok_s=output_tokens / wall_s if wall_s > 0 else 0.0,
        ttft_p50_s=ttft_p50, ttft_p95_s=percentile(ttfts, 95),
        itl_p50_s=percentile(itls, 50), itl_p95_s=percentile(itls, 95),
        tpot_p50_s=percentile([t for t in map(time_per_output_token, ok) if t is not None], 50),
        e2e_p50_s=percentile([result.e2e_s for result in ok], 50),
        prefill_tok_s=workload.prompt_tokens / ttft_p50 if ttft_p50 and workload.kind not in ("mix", "chat") else None,
        prompt_tokens_reported=mean([r.prompt_tokens for r in ok if r.prompt_tokens is not None]),
        cached_tokens_mean=mean([r.cached_tokens for r in ok if r.cached_tokens is not None]),
        num_errors=len(errors), first_error=errors[0] if errors else None,
        peak_rss_mib=peak_rss_bytes / 2**20 if peak_rss_bytes else None,
        peak_pss_mib=peak_pss_bytes / 2**20 if peak_pss_bytes else None,
        peak_hwm_mib=peak_hwm_bytes / 2**20 if peak_hwm_bytes else None,
    )


def time_per_output_token(result: RequestResult) -> float | None:
    times = result.chunk_times_s
    if len(times) < 2 or result.output_tokens < 2:
        return None
    return (times[-1] - times[0]) / (result.output_tokens - 1)


# ---------------------------------------------------------------- tables


@dataclass(frozen=True)
class Metric:
    key: str  # LevelReport field
    label: str
    scale: float = 1.0  # seconds -> milliseconds where the label says ms
    fmt: str = "{:.1f}"


METRICS = {
    "output_tok_s": Metric("output_tok_s", "output tok/s"),
    "ttft_p50_s": Metric("ttft_p50_s", "TTFT p50 ms", 1000, "{:.0f}"),
    "ttft_p95_s": Metric("ttft_p95_s", "TTFT p95 ms", 1000, "{:.0f}"),
    "itl_p50_s": Metric("itl_p50_s", "ITL p50 ms", 1000),
    "itl_p95_s": Metric("itl_p95_s", "ITL p95 ms", 1000),
    "prefill_tok_s": Metric("prefill_tok_s", "prefill tok/s"),
    "cached_tokens_mean": Metric("cached_tokens_mean", "cached prompt tokens", fmt="{:.0f}"),
    "peak_rss_mib": Metric("peak_rss_mib", "peak RSS MiB", fmt="{:.0f}"),
    "peak_pss_mib": Metric("peak_pss_mib", "peak PSS MiB", fmt="{:.0f}"),
    "peak_hwm_mib": Metric("peak_hwm_mib", "VmHWM MiB", fmt="{:.0f}"),
    "num_errors": Metric("num_errors", "errors", fmt="{:d}"),
}

# What is worth comparing for each kind of workload (the JSON has everything).
_LATENCY = ("output_tok_s", "ttft_p50_s", "ttft_p95_s", "itl_p50_s", "itl_p95_s")
_MEMORY = ("peak_rss_mib", "peak_pss_mib", "peak_hwm_mib", "num_errors")
KIND_METRICS = {
    "decode": (*_LATENCY, *_MEMORY),
    "prefill": ("prefill_tok_s", "ttft_p50_s", *_MEMORY),
    "shared": ("ttft_p50_s", "ttft_p95_s", "cached_tokens_mean", "output_tok_s", *_MEMORY),
    "cold": ("ttft_p50_s", "ttft_p95_s", "cached_tokens_mean", "output_tok_s", *_MEMORY),
    "mix": (*_LATENCY, *_MEMORY),
    "chat": (*_LATENCY, "cached_tokens_mean", *_MEMORY),
    "json": (*_LATENCY, *_MEMORY),
}

LEVEL_COLUMNS = ("output_tok_s", "ttft_p50_s", "ttft_p95_s", "itl_p50_s", "itl_p95_s", "prefill_tok_s",
                 "cached_tokens_mean", "peak_rss_mib", "peak_pss_mib", "peak_hwm_mib", "num_errors")


def format_value(metric: Metric, value: float | None) -> str:
    if value is None:
        return "-"
    return metric.fmt.format(value * metric.scale if metric.scale != 1 else value)


def format_ratio(left: float | None, right: float | None) -> str:
    """left / right as '0.85x'; '-' when either is missing or the divisor is zero."""
    if left is None or right is None or right == 0:
        return "-"
    return f"{left / right:.2f}x"


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]], num_left: int = 1) -> str:
    """Aligned plain-text columns; the first `num_left` columns align left, numbers right."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows)]

    def line(cells: Sequence[str]) -> str:
        padded = (cell.ljust(w) if i < num_left else cell.rjust(w) for i, (cell, w) in enumerate(zip(cells, widths)))
        return "  ".join(padded)

    return "\n".join([line(headers), line(["-" * w for w in widths]), *map(line, rows)])


def level_table(reports: Sequence[LevelReport]) -> str:
    """One row per level of one server, every headline metric."""
    headers = ["workload", "C", *(METRICS[key].label for key in LEVEL_COLUMNS)]
    rows = [[r.workload, str(r.concurrency), *(format_value(METRICS[k], getattr(r, k)) for k in LEVEL_COLUMNS)]
            for r in reports]
    return format_table(headers, rows, num_left=1)


def comparison_rows(left: Sequence[LevelReport], right: Sequence[LevelReport]) -> list[list[str]]:
    """Rows (workload, metric, left, right, left/right) for workloads in `left`'s order."""
    by_name = {report.workload: report for report in right}
    rows = []
    for report in left:
        other = by_name.get(report.workload)
        for key in KIND_METRICS[report.kind]:
            metric, mine, theirs = METRICS[key], getattr(report, key), getattr(other, key) if other else None
            rows.append([report.workload, metric.label, format_value(metric, mine), format_value(metric, theirs),
                         format_ratio(mine, theirs)])
    return rows


def comparison_table(left: Sequence[LevelReport], right: Sequence[LevelReport], left_name: str, right_name: str) -> str:
    headers = ["workload", "metric", left_name, right_name, f"{left_name} / {right_name}"]
    return format_table(headers, comparison_rows(left, right), num_left=2)
