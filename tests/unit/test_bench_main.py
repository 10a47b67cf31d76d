"""`python -m bench` refuses to start, naming what to install, when its extra is missing."""

from __future__ import annotations

import importlib.util

import pytest

import bench.__main__ as bench_main


def test_missing_bench_extra_stops_before_any_level(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "psutil" else real_find_spec(name, *a))
    with pytest.raises(SystemExit) as stop:
        bench_main.main(["run", "--url", "http://127.0.0.1:9", "--concurrency", "1"])
    assert "psutil" in str(stop.value.code) and ".[bench]" in str(stop.value.code)

