"""Run one workload against one server: warm-up, the measured level with a progress bar, the summary."""

from __future__ import annotations

import asyncio
import sys
from dataclasses import dataclass

from bench.client import RequestResult, Target, run_jobs
from bench.report import LevelReport, summarize_level
from bench.workloads import Workload, json_schema, workload_jobs


@dataclass(frozen=True)
class RunOptions:
    """How a workload is run, the same for every server of a comparison."""

    seed: str = "0"
    warmup: bool = True
    progress: bool = True
    temperature: float = 0.0  # of every request (0: greedy)


@dataclass
class LevelRun:
    report: LevelReport
    results: list[RequestResult]


def run_workload(target: Target, workload: Workload, server: str, server_pid: int | None,
                 options: RunOptions = RunOptions()) -> LevelRun:
    from bench.rss import (
        PeakRSSSampler,  # psutil: a bench extra, kept out of the unit tests' imports
    )

    jobs = workload_jobs(workload, options.seed)
    schema = json_schema(workload)
    if options.warmup:
        # One short request first: the first request on a fresh server pays one-off costs (under a
        # schema, its compile).
        (prompt_ids, _), = jobs[0]
        asyncio.run(run_jobs(target, [[(prompt_ids, min(workload.max_tokens, 4))]], 1, json_schema=schema,
                             temperature=options.temperature))
    bar = _progress(options, f"{server} {workload.name}", workload.num_requests)
    with PeakRSSSampler(server_pid) as sampler, bar:
        results, wall_s = asyncio.run(
            run_jobs(target, jobs[1:], workload.concurrency, lambda _: bar.update(1), schema, options.temperature)
        )
    return LevelRun(summarize_level(server, workload, results, wall_s, sampler.peak_bytes, sampler.peak_pss_bytes,
                                     sampler.peak_hwm_bytes), results)


def _progress(options: RunOptions, description: str, total: int):
    from tqdm import tqdm

    return tqdm(total=total, desc=description, unit="req", file=sys.stderr, disable=not options.progress,
                mininterval=0.5, leave=True)
