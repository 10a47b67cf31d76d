"""Where a run's results go: results.json (every level and request) and plot.png."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from bench.runner import LevelRun

OUT_ROOT = Path(__file__).resolve().parent / "out"  # git-ignored


def default_out_dir(prefix: str) -> Path:
    return OUT_ROOT / f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}"


def results_json(meta: dict, runs: Sequence[LevelRun], table: str) -> dict:
    return {
        "meta": meta,
        "levels": [asdict(run.report) for run in runs],
        "requests": {f"{run.report.server}/{run.report.workload}": [r.to_json() for r in run.results] for run in runs},
        "table": table,
    }


def write_json(out_dir: Path, meta: dict, runs: Sequence[LevelRun], table: str = "") -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "results.json"
    path.write_text(json.dumps(results_json(meta, runs, table), indent=2) + "\n")
    return path


def write_outputs(out_dir: Path, meta: dict, runs: Sequence[LevelRun], table: str, title: str) -> tuple[Path, Path]:
    """results.json and plot.png."""
    from bench.plot import plot_reports

    json_path, png_path = write_json(out_dir, meta, runs, table), out_dir / "plot.png"
    plot_reports([run.report for run in runs], png_path, title)
    return json_path, png_path
