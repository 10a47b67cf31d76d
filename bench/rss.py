"""Peak resident memory of a server process and its children, sampled on a thread: the sum of
their RSS, and the sum of their PSS (proportional set size: a page shared by N processes counts
1/N in each), which does not count twice the pages a server's processes share (lmserve's grammar
compile workers fork from a process that shares torch's and xgrammar's code with the server).
Beside them the kernel's own peak, VmHWM: the most each process was ever resident, which no sample
misses, start-up and loading the model included (the RSS and PSS samples start with the level)."""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING

import psutil

if TYPE_CHECKING:
    from typing import Self  # 3.11+, and only for the checker

# PSS is read at most as often as keeps its reads under this share of a core. Reading it walks the
# server's page tables under its memory-map lock: ~29 ms of CPU for a 1.1 GiB lmserve at 64 streams,
# so at every 100 ms sample it took 12-14% of that server's output tok/s on a 2-vCPU machine
# (bench/RESULTS.md, thirty-second sitting). RSS and VmHWM are ~1 ms reads of /proc/<pid>/status.
PSS_CPU_SHARE = 0.01


class PeakRSSSampler:
    """`with PeakRSSSampler(pid) as sampler: ...` then `sampler.peak_bytes`, `sampler.peak_pss_bytes`
    and `sampler.peak_hwm_bytes` (None without a pid, or PSS where the kernel does not give it).

    Sampling every 100 ms misses spikes shorter than that; a server's footprint (weights, KV cache,
    activations of a full batch) lasts for the whole level, so the peak is still representative.
    PSS is sampled more sparsely where reading it is costly (PSS_CPU_SHARE).
    """

    def __init__(self, pid: int | None, interval_s: float = 0.1) -> None:
        self.pid = pid
        self.interval_s = interval_s
        self.peak_bytes: int | None = None
        self.peak_pss_bytes: int | None = None
        self.peak_hwm_bytes: int | None = None
        self._next_pss = 0.0  # time.monotonic() of the next PSS sample
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-rss", daemon=True)

    def __enter__(self) -> Self:
        if self.pid is not None:
            self._sample()  # at least one sample, however short the level
            self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def _sample(self) -> None:
        rss = tree_rss_bytes(self.pid)
        if rss is not None and (self.peak_bytes is None or rss > self.peak_bytes):
            self.peak_bytes = rss
        now = time.monotonic()
        if now >= self._next_pss:
            spent = time.thread_time()  # this thread's CPU, the kernel's walk of the page tables included
            pss = tree_pss_bytes(self.pid)
            self._next_pss = now + max(self.interval_s, (time.thread_time() - spent) / PSS_CPU_SHARE)
            if pss is not None and (self.peak_pss_bytes is None or pss > self.peak_pss_bytes):
                self.peak_pss_bytes = pss
        hwm = tree_hwm_bytes(self.pid)  # each process's only grows: the largest sum is the last one taken
        if hwm is not None and (self.peak_hwm_bytes is None or hwm > self.peak_hwm_bytes):
            self.peak_hwm_bytes = hwm


def tree_rss_bytes(pid: int) -> int | None:
    """RSS of `pid` plus all its descendants; None once the process is gone."""
    return _tree_sum(pid, lambda process: process.memory_info().rss)


def tree_pss_bytes(pid: int) -> int | None:
    """PSS of `pid` plus all its descendants (Linux's smaps_rollup); None once the process is gone
    or where the kernel gives no PSS."""
    return _tree_sum(pid, lambda process: _proc_bytes(process, "smaps_rollup", "Pss:"))


def tree_hwm_bytes(pid: int) -> int | None:
    """VmHWM (the kernel's peak resident set) of `pid` plus all its descendants; None once the
    process is gone."""
    return _tree_sum(pid, lambda process: _proc_bytes(process, "status", "VmHWM:"))


def _proc_bytes(process: psutil.Process, file_name: str, field: str) -> int:
    """A size in kB that /proc/<pid>/<file_name> gives on its line starting `field`, in bytes."""
    try:
        with open(f"/proc/{process.pid}/{file_name}") as file:
            return next(int(line.split()[1]) * 1024 for line in file if line.startswith(field))
    except (OSError, StopIteration):
        raise psutil.NoSuchProcess(process.pid) from None


def _tree_sum(pid: int, measure) -> int | None:
    try:
        root = psutil.Process(pid)
        processes = [root, *root.children(recursive=True)]
        total = measure(root)
    except psutil.Error:
        return None
    for process in processes[1:]:
        try:
            total += measure(process)
        except psutil.Error:  # a child that exited between listing and sampling
            pass
    return total
