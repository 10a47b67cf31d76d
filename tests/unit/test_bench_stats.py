import pytest

from bench.stats import gaps, mean, percentile


def test_percentile_interpolates_between_ranks_like_numpy():
    values = [4.0, 1.0, 3.0, 2.0]  # unsorted on purpose
    assert percentile(values, 0) == 1.0
    assert percentile(values, 100) == 4.0
    assert percentile(values, 50) == 2.5
    assert percentile(values, 95) == pytest.approx(3.85)  # rank 2.85: 3 + 0.85 * (4 - 3)


def test_percentile_edge_cases():
    assert percentile([], 50) is None
    assert percentile([7.0], 95) == 7.0
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def test_mean_and_gaps():
    assert mean([]) is None
    assert mean([1, 2, 6]) == 3
    assert gaps([0.5, 0.75, 1.5]) == [0.25, 0.75]
    assert gaps([0.5]) == []
