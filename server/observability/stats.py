"""Per-model-version statistics in Triton's ModelStatistics shape (pure, no library imports)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass(slots=True)
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, seconds: float, count: int = 1) -> None:
        self.count += count
        self.ns += int(seconds * 1e9)


@dataclass(slots=True)
class BatchSizeStats:
    compute_infer: Duration = field(default_factory=Duration)


@dataclass(slots=True)
class ModelStats:
    """Counts and accumulated times for one served model version.

    success / fail: end-to-end requests in the server; queue: time each request waited for its
    batch; compute_infer: per request, the run of the batch it rode in; inference_count: rows;
    execution_count: successful batches (Triton's meaning; failed ones count in `failed_batches`);
    batch_stats: per executed batch size.
    """

    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    inference_count: int = 0
    execution_count: int = 0
    failed_batches: int = 0
    last_inference_ms: int = 0
    batch_stats: dict[int, BatchSizeStats] = field(default_factory=dict)

    def request_done(self, seconds: float, ok: bool) -> None:
        (self.success if ok else self.fail).add(seconds)

    def batch_done(
        self, rows: int, queue_waits: Sequence[float], compute_s: float, ok: bool
    ) -> None:
        self.last_inference_ms = time.time_ns() // 1_000_000
        if not ok:
            self.failed_batches += 1
            return
        self.execution_count += 1
        self.inference_count += rows
        requests = len(queue_waits)
        self.queue.add(sum(queue_waits), requests)
        self.compute_infer.add(compute_s * requests, requests)
        per_size = self.batch_stats.get(rows)
        if per_size is None:
            per_size = self.batch_stats[rows] = BatchSizeStats()
        per_size.compute_infer.add(compute_s)

    def mean_batch_size(self) -> float:
        return self.inference_count / self.execution_count if self.execution_count else 0.0
