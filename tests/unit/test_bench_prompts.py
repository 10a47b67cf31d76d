import pytest

from bench.prompts import TOKEN_ID_RANGE, make_prompts
from bench.workloads import Workload, level_workloads, parse_kinds, workload_prompts, workload_set


def test_prompts_have_exact_lengths_and_safe_ids():
    prompts = make_prompts(5, 128, seed="s")
    assert [len(p) for p in prompts] == [128] * 5
    low, high = TOKEN_ID_RANGE
    assert all(low <= i < high for p in prompts for i in p)
    assert len({tuple(p[:8]) for p in prompts}) == 5  # distinct from the first tokens on


def test_shared_prefix_is_common_and_the_rest_differs():
    prompts = make_prompts(4, 1600, shared_prefix_tokens=1500, seed="s")
    assert [len(p) for p in prompts] == [1600] * 4
    assert all(p[:1500] == prompts[0][:1500] for p in prompts)
    assert len({tuple(p[1500:]) for p in prompts}) == 4
    assert make_prompts(2, 10, 10, seed="s")[0] == make_prompts(2, 10, 10, seed="s")[1]


def test_prompts_are_deterministic_per_seed():
    assert make_prompts(3, 16, 4, seed="a") == make_prompts(3, 16, 4, seed="a")
    assert make_prompts(3, 16, 4, seed="a") != make_prompts(3, 16, 4, seed="b")
    with pytest.raises(ValueError):
        make_prompts(1, 10, shared_prefix_tokens=11)


def test_workload_prompts_add_a_warmup_that_shares_the_prefix_and_differ_by_level():
    shared, cold = level_workloads([4], 1600, 8, shared_prefix_tokens=1500)
    prompts = workload_prompts(shared, "0")
    assert len(prompts) == shared.num_requests + 1 and all(p[:1500] == prompts[0][:1500] for p in prompts)
    cold_prompts = workload_prompts(cold, "0")
    assert len({tuple(p[:1500]) for p in cold_prompts}) == len(cold_prompts)
    c1, c2 = level_workloads([1, 2], 64, 8)
    assert workload_prompts(c1, "0")[0] != workload_prompts(c2, "0")[0]


def test_level_workloads():
    levels = level_workloads([1, 8], 128, 256)
    assert [(w.name, w.concurrency, w.num_requests) for w in levels] == [("decode-c1", 1, 4), ("decode-c8", 8, 16)]
    assert [w.kind for w in level_workloads([2], 1600, 8, 1500, num_requests=3)] == ["shared", "cold"]


def test_default_and_quick_workload_sets():
    default = {w.name: w for w in workload_set()}
    assert list(default) == ["decode-c1", "decode-c4", "decode-c16", "decode-c32", "decode-c64",
                             "prefill-2000", "shared-c16", "cold-c16"]
    assert (default["decode-c64"].num_requests, default["decode-c64"].context_tokens) == (128, 384)
    assert (default["shared-c16"].shared_prefix_tokens, default["cold-c16"].shared_prefix_tokens) == (1500, 0)
    quick = workload_set(parse_kinds("decode,prefix"), quick=True, concurrencies=[1, 2], max_tokens=16)
    assert [(w.name, w.num_requests, w.max_tokens) for w in quick] == [
        ("decode-c1", 2, 16), ("decode-c2", 2, 16), ("shared-c2", 2, 16), ("cold-c2", 2, 16)]
    with pytest.raises(ValueError):
        parse_kinds("decode,warp")


def test_workload_validates():
    with pytest.raises(ValueError):
        Workload("x", "decode", 0, 1, 10, 1)
