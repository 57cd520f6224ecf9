"""Pure statistics for load runs: durations, percentiles, histograms, merging per-process results.

No grpc here: everything is a function of recorded numbers, so it is unit-tested directly.
Latencies are integer nanoseconds throughout. Like ghz, the latency figures (average, fastest,
slowest, distribution, histogram) describe successful calls only; ``count`` and ``rps`` count every
call, failed ones included. Status names are gRPC's (``OK``, ``UNAVAILABLE``, ...) plus
``STREAM_ERROR``: a ModelStreamInfer reply carrying ``error_message``, or a stream that ended before
its reply.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

PERCENTILES: tuple[float, ...] = (10, 25, 50, 75, 90, 95, 99, 99.9)
HISTOGRAM_BUCKETS = 10

_UNIT_NS = {
    "ns": 1,
    "us": 1_000,
    "µs": 1_000,
    "ms": 1_000_000,
    "s": 1_000_000_000,
    "m": 60_000_000_000,
    "h": 3_600_000_000_000,
}
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")


def parse_duration(text: str, flag: str) -> float:
    """Parse a Go-style duration (``10s``, ``500ms``, ``1m30s``, ``0``) into seconds.

    Raises ``ValueError`` naming ``flag`` when ``text`` is not a non-negative duration.
    """
    s = text.strip()
    if s == "0":
        return 0.0
    pos = 0
    total_ns = 0.0
    while pos < len(s):
        m = _DURATION_PART.match(s, pos)
        if m is None:
            break
        total_ns += float(m.group(1)) * _UNIT_NS[m.group(2)]
        pos = m.end()
    if not s or pos != len(s):
        raise ValueError(f"{flag}: invalid duration {text!r} (expected e.g. 10s, 500ms, 1m, 1m30s)")
    return total_ns / 1e9


def percentile(sorted_ns: npt.NDArray[np.int64], p: float) -> int:
    """Nearest-rank percentile of an ascending array: an observed value, never interpolated."""
    n = len(sorted_ns)
    if n == 0:
        raise ValueError("percentile of no samples")
    # round() first: 99.9 / 100 * 1000 is 999.0000000000001 in floating point.
    rank = max(1, math.ceil(round(p * n / 100, 9)))
    return int(sorted_ns[min(rank, n) - 1])


@dataclass(frozen=True)
class LatencyPoint:
    percentage: float
    latency_ns: int


@dataclass(frozen=True)
class Bucket:
    """Calls with ``previous mark < latency <= mark`` (the first bucket: ``latency <= mark``)."""

    mark_ns: int
    count: int
    frequency: float


def latency_distribution(
    sorted_ns: npt.NDArray[np.int64], percentages: Iterable[float] = PERCENTILES
) -> list[LatencyPoint]:
    if len(sorted_ns) == 0:
        return []
    return [LatencyPoint(p, percentile(sorted_ns, p)) for p in percentages]


def histogram(sorted_ns: npt.NDArray[np.int64], buckets: int = HISTOGRAM_BUCKETS) -> list[Bucket]:
    """ghz's histogram: ``buckets`` equal steps from fastest to slowest, plus a mark at slowest."""
    n = len(sorted_ns)
    if n == 0:
        return []
    fastest, slowest = int(sorted_ns[0]), int(sorted_ns[-1])
    step = (slowest - fastest) / buckets
    marks = np.array([fastest + round(step * i) for i in range(buckets)] + [slowest], np.int64)
    # side="left": a latency lands in the first bucket whose mark is >= it.
    index = np.searchsorted(marks, sorted_ns, side="left")
    counts = np.bincount(index, minlength=len(marks))
    return [Bucket(int(m), int(c), float(c) / n) for m, c in zip(marks, counts, strict=True)]


@dataclass(eq=False)
class ProcessResult:
    """What one load process measured inside its window.

    ``latencies_ns`` holds successful calls only; ``status_counts`` counts every call by status
    name (``"OK"`` included); ``error_counts`` counts failed calls by message. ``start_ns`` and
    ``end_ns`` are ``time.monotonic_ns`` readings, comparable across processes on one machine.
    """

    latencies_ns: npt.NDArray[np.int64]
    status_counts: dict[str, int]
    error_counts: dict[str, int]
    start_ns: int
    end_ns: int
    cpu_seconds: float

    @property
    def count(self) -> int:
        return sum(self.status_counts.values())


def merge(results: Sequence[ProcessResult]) -> ProcessResult:
    """Combine processes' results as if one process had made every call."""
    if not results:
        raise ValueError("merge of no results")
    status: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    for r in results:
        status.update(r.status_counts)
        errors.update(r.error_counts)
    return ProcessResult(
        latencies_ns=np.concatenate([r.latencies_ns for r in results]).astype(np.int64),
        status_counts=dict(status),
        error_counts=dict(errors),
        start_ns=min(r.start_ns for r in results),
        end_ns=max(r.end_ns for r in results),
        cpu_seconds=sum(r.cpu_seconds for r in results),
    )


@dataclass(frozen=True)
class Report:
    """A finished run, in ghz's terms (nanoseconds) plus batchline's extras."""

    call: str
    concurrency: int
    procs: int
    count: int
    total_ns: int
    average_ns: int
    fastest_ns: int
    slowest_ns: int
    rps: float
    latency_distribution: list[LatencyPoint]
    histogram: list[Bucket]
    status_codes: dict[str, int]
    errors: dict[str, int]
    client_cpu_seconds: float

    def to_dict(self) -> dict[str, Any]:
        """The JSON document, with ghz's key names."""
        return {
            "call": self.call,
            "count": self.count,
            "total": self.total_ns,
            "average": self.average_ns,
            "fastest": self.fastest_ns,
            "slowest": self.slowest_ns,
            "rps": self.rps,
            "latencyDistribution": [
                {"percentage": p.percentage, "latency": p.latency_ns}
                for p in self.latency_distribution
            ],
            "histogram": [
                {"mark": b.mark_ns, "count": b.count, "frequency": b.frequency}
                for b in self.histogram
            ],
            "statusCodeDistribution": dict(self.status_codes),
            "errorDistribution": dict(self.errors),
            "clientCpuSeconds": self.client_cpu_seconds,
            "concurrency": self.concurrency,
            "procs": self.procs,
        }


def summarise(result: ProcessResult, *, call: str, concurrency: int, procs: int) -> Report:
    """Turn a (merged) result into a report."""
    lat = np.sort(result.latencies_ns)
    total_ns = max(0, result.end_ns - result.start_ns)
    count = result.count
    ok = len(lat)
    return Report(
        call=call,
        concurrency=concurrency,
        procs=procs,
        count=count,
        total_ns=total_ns,
        average_ns=int(lat.mean()) if ok else 0,
        fastest_ns=int(lat[0]) if ok else 0,
        slowest_ns=int(lat[-1]) if ok else 0,
        rps=count / (total_ns / 1e9) if total_ns > 0 else 0.0,
        latency_distribution=latency_distribution(lat),
        histogram=histogram(lat),
        status_codes=_sorted_counts(result.status_counts),
        errors=_sorted_counts(result.error_counts),
        client_cpu_seconds=round(result.cpu_seconds, 3),
    )


def _sorted_counts(counts: Mapping[str, int]) -> dict[str, int]:
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
