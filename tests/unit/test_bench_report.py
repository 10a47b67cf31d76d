from bench.client import RequestResult
from bench.report import (
    METRICS,
    comparison_rows,
    comparison_table,
    format_ratio,
    format_table,
    format_value,
    level_table,
    summarize_level,
)
from bench.servers import llama_context_tokens
from bench.workloads import Workload

DECODE = Workload("decode-c2", "decode", 2, 3, 128, 4)


def result(ttft: float, times: list[float], tokens: int, error: str | None = None) -> RequestResult:
    usage = {"prompt_tokens": 128, "completion_tokens": tokens, "prompt_tokens_details": {"cached_tokens": 16}}
    return RequestResult(error=error, ttft_s=ttft, e2e_s=times[-1] if times else 0.0, chunk_times_s=times, usage=usage)


def test_summarize_level():
    # Binary fractions, so every statistic below is exact.
    results = [result(0.5, [0.5, 0.625, 0.75, 0.875], 4), result(1.0, [1.0, 1.25, 1.5, 1.75], 4),
               result(0, [], 0, "HTTP 500: boom")]
    report = summarize_level("srv", DECODE, results, wall_s=2.0, peak_rss_bytes=3 * 2**20, peak_pss_bytes=2**20,
                             peak_hwm_bytes=5 * 2**20)
    assert (report.output_tokens, report.output_tok_s) == (8, 4.0)  # the failed request counts for nothing
    assert (report.ttft_p50_s, report.e2e_p50_s) == (0.75, 1.3125)
    assert (report.itl_p50_s, report.itl_p95_s) == (0.1875, 0.25)  # gaps 0.125 x3 and 0.25 x3
    assert report.tpot_p50_s == 0.1875  # 0.375 / 3 and 0.75 / 3
    assert report.prefill_tok_s == 128 / 0.75
    assert (report.num_errors, report.first_error, report.peak_rss_mib, report.peak_pss_mib, report.peak_hwm_mib) == (
        1, "HTTP 500: boom", 3.0, 1.0, 5.0)
    assert (report.prompt_tokens_reported, report.cached_tokens_mean) == (128, 16)


def test_summarize_level_with_no_successes_has_no_latencies():
    report = summarize_level("srv", DECODE, [result(0, [], 0, "down")], wall_s=1.0, peak_rss_bytes=None)
    assert (report.output_tok_s, report.ttft_p50_s, report.itl_p95_s, report.prefill_tok_s, report.peak_rss_mib) == (
        0.0, None, None, None, None)


def test_format_value_and_ratio():
    assert format_value(METRICS["ttft_p50_s"], 0.1234) == "123"
    assert format_value(METRICS["itl_p50_s"], 0.0123) == "12.3"
    assert format_value(METRICS["num_errors"], 0) == "0"
    assert format_value(METRICS["output_tok_s"], None) == "-"
    assert format_ratio(150.0, 200.0) == "0.75x"
    assert format_ratio(1.0, 0) == "-" and format_ratio(None, 2.0) == "-"


def test_format_table_aligns_columns():
    assert format_table(["name", "n"], [["a", "1"], ["bbb", "100"]]) == (
        "name    n\n"
        "----  ---\n"
        "a       1\n"
        "bbb   100"
    )


def test_comparison_rows_and_table():
    mine = summarize_level("lmserve", DECODE, [result(0.5, [0.5, 0.625], 2)], 1.0, None)
    theirs = summarize_level("llama.cpp", DECODE, [result(0.25, [0.25, 0.5], 2)], 0.5, None)
    rows = comparison_rows([mine], [theirs])
    assert rows[0] == ["decode-c2", "output tok/s", "2.0", "4.0", "0.50x"]
    assert rows[1] == ["decode-c2", "TTFT p50 ms", "500", "250", "2.00x"]
    assert rows[3][2:] == ["125.0", "250.0", "0.50x"]  # ITL p50
    assert rows[-1] == ["decode-c2", "errors", "0", "0", "-"]
    missing = comparison_rows([mine], [])
    assert missing[0][3:] == ["-", "-"]
    table = comparison_table([mine], [theirs], "lmserve", "llama.cpp").splitlines()
    assert table[0].split() == ["workload", "metric", "lmserve", "llama.cpp", "lmserve", "/", "llama.cpp"]
    assert table[2].split() == ["decode-c2", "output", "tok/s", "2.0", "4.0", "0.50x"]
    assert len(level_table([mine, theirs]).splitlines()) == 4


def test_llama_context_is_per_slot_rounded_times_slots():
    assert llama_context_tokens(Workload("d", "decode", 64, 128, 128, 256)) == 64 * 512
    assert llama_context_tokens(Workload("p", "prefill", 1, 3, 2000, 1)) == 2048
    assert llama_context_tokens(Workload("s", "shared", 16, 16, 1600, 32, 1500)) == 16 * 1792


def test_a_process_trees_pss_counts_its_shared_pages_once():
    # a forked child shares its parent's pages: summed RSS counts them twice, summed PSS once
    import os
    import time

    from bench.rss import tree_pss_bytes, tree_rss_bytes

    ballast = bytearray(os.urandom(64 * 2**20))  # 64 MiB the child shares until it writes
    child = os.fork()
    if child == 0:
        time.sleep(5)
        os._exit(0)
    try:
        time.sleep(0.2)
        rss, pss = tree_rss_bytes(os.getpid()), tree_pss_bytes(os.getpid())
        assert rss - pss > 48 * 2**20  # about the ballast once more, and the interpreter's own pages
        assert pss > 64 * 2**20
    finally:
        os.kill(child, 9)
        os.waitpid(child, 0)
    del ballast


def test_a_process_trees_vmhwm_keeps_a_peak_its_rss_has_left():
    # a child resident with 64 MiB more for a moment: its RSS falls back, the kernel's peak stays
    import mmap
    import os
    import time

    from bench.rss import tree_hwm_bytes, tree_rss_bytes

    ready_read, ready_write = os.pipe()
    child = os.fork()
    if child == 0:
        # A mapping of its own, touched, then unmapped (malloc's choice would depend on the
        # process's settings: a server's, set by an earlier test, keeps blocks in its heap).
        ballast = mmap.mmap(-1, 64 * 2**20)
        ballast.write(os.urandom(64 * 2**20))
        ballast.close()
        os.write(ready_write, b"x")
        time.sleep(60)  # until killed
        os._exit(0)
    try:
        assert os.read(ready_read, 1) == b"x"
        assert tree_hwm_bytes(child) - tree_rss_bytes(child) > 48 * 2**20
        with open("/proc/self/status") as status:
            own = int(next(line for line in status if line.startswith("VmHWM:")).split()[1]) * 1024
        child_peak = tree_hwm_bytes(child)
        assert tree_hwm_bytes(os.getpid()) >= own + child_peak  # the tree's sum (peaks only grow)
    finally:
        os.kill(child, 9)
        os.waitpid(child, 0)


def test_the_sampler_reads_pss_only_as_often_as_its_cost_allows(monkeypatch):
    # a PSS read costing 20 ms of CPU is taken every 2 s at most (1% of a core), RSS every interval
    import time

    import bench.rss as rss

    calls = {"rss": 0, "pss": 0}

    def costly_pss(pid):
        calls["pss"] += 1
        spent = time.thread_time()
        while time.thread_time() - spent < 0.02:
            pass
        return 2**20

    def rss_bytes(pid):
        calls["rss"] += 1
        return 2**20

    monkeypatch.setattr(rss, "tree_pss_bytes", costly_pss)
    monkeypatch.setattr(rss, "tree_rss_bytes", rss_bytes)
    monkeypatch.setattr(rss, "tree_hwm_bytes", lambda pid: 2**20)
    with rss.PeakRSSSampler(1, interval_s=0.01) as sampler:
        time.sleep(0.6)
    assert calls["rss"] >= 20 and calls["pss"] == 1
    assert sampler.peak_pss_bytes == sampler.peak_bytes == sampler.peak_hwm_bytes == 2**20
