"""Run one workload against one server: warm-up, the measured level with a progress bar, the summary."""

from __future__ import annotations

import asyncio
import sys
from dataclasses import dataclass

from bench.client import RequestResult, Target, run_requests
from bench.report import LevelReport, summarize_level
from bench.workloads import Workload, workload_prompts


@dataclass(frozen=True)
class RunOptions:
    """How a workload is run, the same for every server of a comparison."""

    seed: str = "0"
    warmup: bool = True
    progress: bool = True


@dataclass
class LevelRun:
    report: LevelReport
    results: list[RequestResult]


def run_workload(target: Target, workload: Workload, server: str, server_pid: int | None,
                 options: RunOptions = RunOptions()) -> LevelRun:
    from bench.rss import (
        PeakRSSSampler,  # psutil: a bench extra, kept out of the unit tests' imports
    )

    prompts = workload_prompts(workload, options.seed)
    if options.warmup:
        # One short request first: the first request on a fresh server pays one-off costs.
        asyncio.run(run_requests(target, prompts[:1], min(workload.max_tokens, 4), 1))
    bar = _progress(options, f"{server} {workload.name}", workload.num_requests)
    with PeakRSSSampler(server_pid) as sampler, bar:
        results, wall_s = asyncio.run(
            run_requests(target, prompts[1:], workload.max_tokens, workload.concurrency, lambda _: bar.update(1))
        )
    return LevelRun(summarize_level(server, workload, results, wall_s, sampler.peak_bytes), results)


def _progress(options: RunOptions, description: str, total: int):
    from tqdm import tqdm

    return tqdm(total=total, desc=description, unit="req", file=sys.stderr, disable=not options.progress,
                mininterval=0.5, leave=True)
