"""Pure statistics behind the load generator's report."""

from __future__ import annotations

import numpy as np
import pytest

from loadtest.stats import (
    PERCENTILES,
    ProcessResult,
    histogram,
    latency_distribution,
    merge,
    parse_duration,
    percentile,
    summarise,
)


def _result(
    latencies: list[int], errors: int = 0, start: int = 0, end: int = 10**9
) -> ProcessResult:
    status = {"OK": len(latencies)} if latencies else {}
    if errors:
        status["UNAVAILABLE"] = errors
    return ProcessResult(
        latencies_ns=np.array(latencies, dtype=np.int64),
        status_counts=status,
        error_counts={"UNAVAILABLE: down": errors} if errors else {},
        start_ns=start,
        end_ns=end,
        cpu_seconds=0.5,
    )


@pytest.mark.parametrize("p", PERCENTILES)
def test_percentile_matches_numpy_nearest_rank(p: float) -> None:
    data = np.sort(np.random.default_rng(7).integers(1_000, 5_000_000, 9_973))
    assert percentile(data, p) == int(np.percentile(data, p, method="inverted_cdf"))


def test_percentiles_of_one_to_a_thousand_are_the_ranks() -> None:
    data = np.arange(1, 1001, dtype=np.int64)
    got = {pt.percentage: pt.latency_ns for pt in latency_distribution(data)}
    assert got == {10: 100, 25: 250, 50: 500, 75: 750, 90: 900, 95: 950, 99: 990, 99.9: 999}


def test_percentile_of_a_single_sample_is_that_sample() -> None:
    assert percentile(np.array([42], dtype=np.int64), 99.9) == 42


def test_histogram_counts_sum_to_count_and_marks_span_fastest_to_slowest() -> None:
    data = np.sort(np.random.default_rng(1).integers(100, 10_000, 5_000))
    buckets = histogram(data)
    assert sum(b.count for b in buckets) == len(data)
    assert sum(b.frequency for b in buckets) == pytest.approx(1.0)
    assert buckets[0].mark_ns == data[0]
    assert buckets[-1].mark_ns == data[-1]
    assert [b.mark_ns for b in buckets] == sorted(b.mark_ns for b in buckets)


def test_histogram_puts_each_latency_in_the_first_bucket_at_or_above_it() -> None:
    data = np.arange(0, 101, dtype=np.int64)  # marks 0, 10, ..., 100
    counts = [b.count for b in histogram(data)]
    assert counts == [1] + [10] * 10


def test_histogram_of_identical_latencies_is_one_full_bucket() -> None:
    buckets = histogram(np.full(20, 7, dtype=np.int64))
    assert buckets[0].count == 20
    assert sum(b.count for b in buckets) == 20


def test_merging_two_processes_equals_computing_on_the_union() -> None:
    rng = np.random.default_rng(3)
    a = rng.integers(10_000, 900_000, 3_000).tolist()
    b = rng.integers(50_000, 2_000_000, 2_000).tolist()
    merged = merge(
        [_result(a, errors=3, start=100, end=900), _result(b, errors=2, start=50, end=1_000)]
    )
    union = _result(a + b, errors=5, start=50, end=1_000)
    union.cpu_seconds = 1.0

    got = summarise(merged, call="c", concurrency=8, procs=2).to_dict()
    want = summarise(union, call="c", concurrency=8, procs=2).to_dict()
    assert got == want
    assert got["count"] == 5_005
    assert got["statusCodeDistribution"] == {"OK": 5_000, "UNAVAILABLE": 5}
    assert got["errorDistribution"] == {"UNAVAILABLE: down": 5}
    assert got["total"] == 950
    assert got["clientCpuSeconds"] == 1.0


def test_report_counts_failures_in_rps_but_not_in_latencies() -> None:
    report = summarise(
        _result([10, 20, 30], errors=1, end=2 * 10**9), call="c", concurrency=1, procs=1
    )
    assert report.count == 4
    assert report.rps == pytest.approx(2.0)
    assert (report.fastest_ns, report.slowest_ns, report.average_ns) == (10, 30, 20)


def test_report_without_successes_has_empty_latency_figures() -> None:
    report = summarise(_result([], errors=5), call="c", concurrency=1, procs=1)
    assert report.count == 5
    assert report.latency_distribution == []
    assert report.histogram == []
    assert report.fastest_ns == report.slowest_ns == 0


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("10s", 10.0),
        ("500ms", 0.5),
        ("1m", 60.0),
        ("1m30s", 90.0),
        ("1.5s", 1.5),
        ("250us", 0.00025),
        ("0", 0.0),
    ],
)
def test_parse_duration_reads_go_style_durations(text: str, seconds: float) -> None:
    assert parse_duration(text, "-z/--duration") == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "10", "10x", "s", "-1s", "1s junk", "ten seconds"])
def test_parse_duration_rejects_bad_input_naming_the_flag(text: str) -> None:
    with pytest.raises(ValueError, match=r"-z/--duration"):
        parse_duration(text, "-z/--duration")
