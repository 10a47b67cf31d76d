"""One PNG per run: throughput and latency against concurrency, and TTFT of the one-off workloads."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from bench.report import LevelReport

SERIES_KINDS = ("decode", "shared", "cold")  # plotted against concurrency
BAR_KINDS = ("prefill", "shared", "cold")  # plotted as TTFT bars, one group per workload


def plot_reports(reports: Sequence[LevelReport], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display on a server; must precede pyplot
    import matplotlib.pyplot as plt

    bars = [report for report in reports if report.kind in BAR_KINDS]
    num_panels = 3 if bars else 2
    fig, axes = plt.subplots(1, num_panels, figsize=(6 * num_panels, 4.8))
    _throughput_panel(axes[0], reports)
    _latency_panel(axes[1], reports)
    if bars:
        _ttft_bars(axes[2], bars)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _series(reports: Sequence[LevelReport]) -> dict[tuple[str, str], list[LevelReport]]:
    """(server, kind) -> that server's levels of that kind, by concurrency."""
    series: dict[tuple[str, str], list[LevelReport]] = {}
    for report in reports:
        if report.kind in SERIES_KINDS:
            series.setdefault((report.server, report.kind), []).append(report)
    return {key: sorted(levels, key=lambda r: r.concurrency) for key, levels in series.items()}


def _throughput_panel(ax, reports: Sequence[LevelReport]) -> None:
    for (server, kind), levels in _series(reports).items():
        ax.plot([r.concurrency for r in levels], [r.output_tok_s for r in levels], marker="o", label=f"{server} {kind}")
    ax.set_ylim(bottom=0)
    _concurrency_axis(ax, "aggregate output tokens/s")


def _latency_panel(ax, reports: Sequence[LevelReport]) -> None:
    for (server, kind), levels in _series(reports).items():
        x = [r.concurrency for r in levels]
        line, = ax.plot(x, _ms([r.ttft_p50_s for r in levels]), marker="o", label=f"{server} {kind} TTFT p50")
        ax.plot(x, _ms([r.itl_p50_s for r in levels]), marker="s", linestyle="--", color=line.get_color(),
                label=f"{server} {kind} ITL p50")
    ax.set_yscale("log")
    _concurrency_axis(ax, "latency (ms, log)")


def _ttft_bars(ax, reports: Sequence[LevelReport]) -> None:
    workloads = list(dict.fromkeys(r.workload for r in reports))
    servers = list(dict.fromkeys(r.server for r in reports))
    width = 0.8 / len(servers)
    for i, server in enumerate(servers):
        by_name = {r.workload: r for r in reports if r.server == server}
        values = _ms([by_name[w].ttft_p50_s if w in by_name else None for w in workloads])
        ax.bar([j + i * width for j in range(len(workloads))], [v or 0 for v in values], width, label=server)
    ax.set_xticks([j + width * (len(servers) - 1) / 2 for j in range(len(workloads))], workloads)
    ax.set_ylabel("TTFT p50 (ms)")
    ax.set_title("prefill and prefix cache")
    ax.legend(fontsize=8)


def _concurrency_axis(ax, ylabel: str) -> None:
    ax.set_xscale("log", base=2)
    levels = sorted({x for line in ax.lines for x in line.get_xdata()})
    if levels:  # plain "1 4 16 64" rather than powers of two
        ax.set_xticks(levels, [str(int(x)) for x in levels])
        ax.minorticks_off()
    ax.set_xlabel("concurrent streams")
    ax.set_ylabel(ylabel)
    ax.grid(True, which="both", alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=8)


def _ms(values: Sequence[float | None]) -> list[float | None]:
    return [v * 1000 if v is not None else None for v in values]
