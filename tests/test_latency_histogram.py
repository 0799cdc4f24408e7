"""The notify latency histogram: buckets an operator can read, quantiles inside a bucket.

Expected quantiles are worked out by hand from the bucket bounds (linear
interpolation between a bucket's lower and upper bound), never with the
histogram's own code.
"""

from __future__ import annotations

from itertools import pairwise

import pytest
from prometheus_client.core import Metric

from indicators.cli import format_status
from indicators.metrics import EngineCollector
from indicators.stats import LATENCY_BOUNDS, EngineStats, LatencyHistogram

US = 1e-6


def test_the_buckets_start_at_5_us_and_end_at_1_s() -> None:
    assert LATENCY_BOUNDS[0] == pytest.approx(5 * US)
    assert LATENCY_BOUNDS[-1] == 1.0
    assert list(LATENCY_BOUNDS) == sorted(set(LATENCY_BOUNDS))


@pytest.mark.parametrize(("fast", "slow"), [(10, 100), (5, 10), (20, 50), (100, 1000)])
def test_latencies_a_few_times_apart_land_in_different_buckets(fast: float, slow: float) -> None:
    histogram = LatencyHistogram()
    histogram.observe(fast * US)
    histogram.observe(slow * US)
    filled = [index for index, count in enumerate(histogram.counts) if count]
    assert len(filled) == 2, f"{fast} us and {slow} us share a bucket"


def test_no_two_neighbouring_bounds_are_more_than_2x_apart() -> None:
    ratios = [b / a for a, b in pairwise(LATENCY_BOUNDS)]
    assert max(ratios) <= 2.0


def test_an_empty_histogram_has_no_quantile() -> None:
    histogram = LatencyHistogram()
    assert histogram.quantile(0.5) is None
    assert histogram.report(0.99) is None
    assert histogram.count == 0


def test_the_median_is_interpolated_within_its_bucket() -> None:
    histogram = LatencyHistogram()
    histogram.observe(12 * US, weight=100)  # all in the (10 us, 15 us] bucket
    # rank 50 of 100 in a bucket from 10 to 15 us: 10 + 5 * 50 / 100
    assert histogram.quantile(0.5) == pytest.approx(12.5 * US)
    # rank 99 of 100: 10 + 5 * 99 / 100
    assert histogram.quantile(0.99) == pytest.approx(14.95 * US)
    assert histogram.quantile(0.5) not in LATENCY_BOUNDS


def test_quantiles_across_buckets_count_what_lies_below() -> None:
    histogram = LatencyHistogram()
    histogram.observe(12 * US, weight=90)  # (10, 15]
    histogram.observe(40 * US, weight=10)  # (30, 50]
    # p50: rank 50 of the 90 in (10, 15]: 10 + 5 * 50 / 90
    assert histogram.quantile(0.5) == pytest.approx((10 + 5 * 50 / 90) * US)
    # p95: rank 95 is the 5th of the 10 in (30, 50]: 30 + 20 * 5 / 10
    assert histogram.quantile(0.95) == pytest.approx(40 * US)
    # p99: the 9th of those 10: 30 + 20 * 9 / 10
    assert histogram.quantile(0.99) == pytest.approx(48 * US)
    assert histogram.quantile(1.0) == pytest.approx(50 * US)


def test_the_lowest_bucket_starts_at_zero() -> None:
    histogram = LatencyHistogram()
    histogram.observe(1 * US, weight=4)
    # rank 2 of 4 in [0, 5 us]: 5 * 2 / 4
    assert histogram.quantile(0.5) == pytest.approx(2.5 * US)


def test_empty_buckets_between_do_not_shift_the_quantile() -> None:
    histogram = LatencyHistogram()
    histogram.observe(6 * US)  # (5, 7]
    histogram.observe(600 * US)  # (500, 700]
    # rank 1 of 2 is the whole (5, 7] bucket: its upper bound exactly
    assert histogram.quantile(0.5) == pytest.approx(7 * US)
    # rank 1.5: half way into (500, 700]
    assert histogram.quantile(0.75) == pytest.approx(600 * US)


def test_past_the_last_bucket_is_reported_as_a_string() -> None:
    histogram = LatencyHistogram()
    histogram.observe(3.0, weight=2)
    assert histogram.quantile(0.5) == float("inf")
    assert histogram.report(0.5) == "over 1 s"


def test_weights_count_every_notification_and_the_sum() -> None:
    histogram = LatencyHistogram()
    histogram.observe(20 * US, weight=3)
    histogram.observe(80 * US)
    assert histogram.count == 4
    assert histogram.total == pytest.approx(140 * US)
    assert histogram.cumulative()[-1] == (float("inf"), 4)


def test_query_stats_shows_the_interpolated_quantiles() -> None:
    stats = EngineStats()
    stats.latency.observe(12 * US, weight=100)
    shown = stats.as_dict()
    assert shown["latency-p50"] == pytest.approx(12.5 * US)
    assert shown["latency-p99"] == pytest.approx(14.95 * US)


def test_status_prints_microseconds_not_a_bucket_bound() -> None:
    stats = EngineStats()
    stats.latency.observe(12 * US, weight=100)
    text = format_status([], stats.as_dict())
    assert "latency-p50: 12.5 us" in text
    assert "latency-p99: 14.9 us" in text or "latency-p99: 15.0 us" in text
    assert "<=" not in text


def test_status_without_observations_shows_a_dash() -> None:
    text = format_status([], EngineStats().as_dict())
    assert "latency-p50: -" in text


def _families(stats: EngineStats) -> dict[str, Metric]:
    collector = EngineCollector(lambda: stats, dict)
    return {family.name: family for family in collector.collect()}


def test_the_metrics_endpoint_exports_the_same_quantiles() -> None:
    stats = EngineStats()
    stats.latency.observe(12 * US, weight=90)
    stats.latency.observe(40 * US, weight=10)
    families = _families(stats)
    (p50,) = families["indicators_notify_latency_p50_seconds"].samples
    (p99,) = families["indicators_notify_latency_p99_seconds"].samples
    assert p50.value == pytest.approx((10 + 5 * 50 / 90) * US)
    assert p99.value == pytest.approx(48 * US)
    buckets = {
        sample.labels["le"]: sample.value
        for sample in families["indicators_notify_latency_seconds"].samples
        if sample.name.endswith("_bucket")
    }
    assert buckets["5e-06"] == 0
    assert buckets["1.5e-05"] == 90
    assert buckets["5e-05"] == 100
    assert buckets["+Inf"] == 100


def test_the_metrics_quantiles_are_absent_until_something_was_observed() -> None:
    families = _families(EngineStats())
    assert families["indicators_notify_latency_p50_seconds"].samples == []


def test_the_zero_quantile_is_the_lower_bound_of_the_first_filled_bucket() -> None:
    histogram = LatencyHistogram()
    histogram.observe(40 * US)  # (30, 50]
    assert histogram.quantile(0.0) == pytest.approx(30 * US)
