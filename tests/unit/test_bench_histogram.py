"""`mesh bench`'s latency histogram: every latency counted once, in the bucket its bound says."""

from __future__ import annotations

from mesh.bench.common import HISTOGRAM_MS, figures, histogram


def test_buckets_are_log_spaced_and_increasing():
    """The bounds rise by the same factor (about 1.4) from 0.25 ms to 256 ms."""
    assert HISTOGRAM_MS[0] == 0.25 and HISTOGRAM_MS[-1] == 256.0
    factors = [b / a for a, b in zip(HISTOGRAM_MS, HISTOGRAM_MS[1:], strict=False)]
    assert all(1.41 < f < 1.42 for f in factors)


def test_each_latency_lands_in_the_first_bucket_whose_bound_holds_it_and_none_is_lost():
    """A latency on a bound counts in that bucket; one above every bound in the open last one;
    the counts add up to the number of latencies."""
    seconds = sorted([0.0001, 0.00025, 0.000251, 0.001, 0.0011, 0.256, 0.3, 5.0])
    counts = histogram(seconds)
    assert len(counts) == len(HISTOGRAM_MS) + 1
    assert sum(counts) == len(seconds)
    at = {b: i for i, b in enumerate(HISTOGRAM_MS)}
    assert counts[at[0.25]] == 2  # 0.1 ms and exactly 0.25 ms
    assert counts[at[0.354]] == 1  # 0.251 ms
    assert counts[at[1.0]] == 1 and counts[at[1.414]] == 1
    assert counts[at[256.0]] == 1
    assert counts[-1] == 2  # 300 ms and 5 s


def test_figures_carry_the_histogram_of_their_latencies():
    """The report's figures hold the bounds and the counts of the same latencies as the percentiles."""
    out = figures(3, [0.003, 0.001, 0.002], 1.0)
    assert out["histogram"]["bounds_ms"] == list(HISTOGRAM_MS)
    assert sum(out["histogram"]["counts"]) == 3
