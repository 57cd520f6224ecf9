"""ModelStats: what each executed batch adds to a model version's statistics."""

from __future__ import annotations

import pytest

from server.observability.stats import ModelStats


def test_successful_batch_adds_rows_execution_and_its_batch_size() -> None:
    stats = ModelStats()
    stats.batch_done(rows=3, queue_waits=[0.001, 0.002], compute_s=0.004, ok=True)
    assert stats.inference_count == 3
    assert stats.execution_count == 1
    assert list(stats.batch_stats) == [3]
    assert stats.batch_stats[3].compute_infer.count == 1
    assert stats.batch_stats[3].compute_infer.ns == 4_000_000


def test_queue_time_is_accumulated_per_request() -> None:
    stats = ModelStats()
    stats.batch_done(rows=3, queue_waits=[0.001, 0.002], compute_s=0.004, ok=True)
    stats.batch_done(rows=1, queue_waits=[0.5], compute_s=0.004, ok=True)
    assert stats.queue.count == 3
    assert stats.queue.ns == pytest.approx(503_000_000, abs=2)


def test_compute_time_is_charged_to_every_request_in_the_batch() -> None:
    stats = ModelStats()
    stats.batch_done(rows=4, queue_waits=[0.0, 0.0, 0.0], compute_s=0.01, ok=True)
    assert stats.compute_infer.count == 3
    assert stats.compute_infer.ns == pytest.approx(30_000_000, abs=2)


def test_batches_are_counted_per_executed_batch_size() -> None:
    stats = ModelStats()
    for rows, compute_s in [(2, 0.001), (8, 0.003), (2, 0.002)]:
        stats.batch_done(rows=rows, queue_waits=[0.0], compute_s=compute_s, ok=True)
    assert sorted(stats.batch_stats) == [2, 8]
    assert stats.batch_stats[2].compute_infer.count == 2
    assert stats.batch_stats[2].compute_infer.ns == pytest.approx(3_000_000, abs=2)
    assert stats.batch_stats[8].compute_infer.count == 1
    assert stats.inference_count == 12
    assert stats.execution_count == 3


def test_failed_batch_counts_as_failed_not_as_an_execution_nor_rows_or_times() -> None:
    """Triton's execution_count counts successful executions; failures are counted apart."""
    stats = ModelStats()
    stats.batch_done(rows=5, queue_waits=[0.1, 0.2], compute_s=0.3, ok=False)
    assert stats.failed_batches == 1
    assert stats.execution_count == 0
    assert stats.inference_count == 0
    assert stats.queue.count == 0
    assert stats.compute_infer.count == 0
    assert stats.batch_stats == {}


def test_batch_done_stamps_the_last_inference_time() -> None:
    stats = ModelStats()
    assert stats.last_inference_ms == 0
    stats.batch_done(rows=1, queue_waits=[0.0], compute_s=0.0, ok=True)
    assert stats.last_inference_ms > 1_600_000_000_000  # milliseconds since the epoch


def test_request_done_counts_success_and_failure_apart() -> None:
    stats = ModelStats()
    stats.request_done(0.25, ok=True)
    stats.request_done(0.5, ok=True)
    stats.request_done(1.0, ok=False)
    assert (stats.success.count, stats.success.ns) == (2, 750_000_000)
    assert (stats.fail.count, stats.fail.ns) == (1, 1_000_000_000)


def test_mean_batch_size_is_rows_per_execution() -> None:
    stats = ModelStats()
    stats.batch_done(rows=2, queue_waits=[0.0], compute_s=0.0, ok=True)
    stats.batch_done(rows=6, queue_waits=[0.0], compute_s=0.0, ok=True)
    assert stats.mean_batch_size() == 4.0


def test_mean_batch_size_without_executions_is_zero() -> None:
    assert ModelStats().mean_batch_size() == 0.0
