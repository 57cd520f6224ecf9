"""Prometheus metrics, registered on a CollectorRegistry owned by one server instance.

Label children are bound once per model version, so the request path pays a dictionary-free
`inc()` / `observe()` and nothing else. Queue depth is read at scrape time, not per request.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from server.observability.stats import ModelStats

# Sub-millisecond work needs sub-millisecond buckets.
LATENCY_BUCKETS = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.00075, 0.001, 0.0025, 0.005, 0.0075,
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
)  # fmt: skip
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class Metrics:
    """The metric families of one server instance."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "batchline_requests",
            "Inference requests by model, version and outcome (a gRPC status name)",
            ["model", "version", "status"],
            registry=r,
        )
        self.request_latency = Histogram(
            "batchline_request_duration_seconds",
            "Time from a validated request to its result, in the server",
            ["model", "version"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_latency = Histogram(
            "batchline_queue_duration_seconds",
            "Time a request waited in its model's queue before its batch ran",
            ["model", "version"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.compute_latency = Histogram(
            "batchline_compute_duration_seconds",
            "Time one batch spent in the model",
            ["model", "version"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "batchline_batch_size_rows",
            "Rows per executed batch",
            ["model", "version"],
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.batches = Counter(
            "batchline_batches",
            "Executed batches by outcome",
            ["model", "version", "outcome"],
            registry=r,
        )
        self.dropped = Counter(
            "batchline_dropped_requests",
            "Requests that never reached the model, by reason (queue_full, cancelled, deadline)",
            ["model", "version", "reason"],
            registry=r,
        )
        self.queue_rows = Gauge(
            "batchline_queue_rows",
            "Rows waiting in a model version's queue",
            ["model", "version"],
            registry=r,
        )
        self.in_flight = Gauge(
            "batchline_requests_in_flight",
            "Inference requests accepted and not yet answered",
            registry=r,
        )
        self.model_info = Gauge(
            "batchline_model_info",
            "Served model versions (value 1), with their alias and artifact sha256",
            ["model", "version", "alias", "sha256"],
            registry=r,
        )

    def for_model(
        self, model: str, version: str, stats: ModelStats, queue_rows: Callable[[], float]
    ) -> ModelObserver:
        self.queue_rows.labels(model, version).set_function(queue_rows)
        return ModelObserver(self, model, version, stats)


class ModelObserver:
    """Feeds one model version's statistics and metrics (the batcher's and pipeline's observer)."""

    __slots__ = (
        "_batch_fail",
        "_batch_ok",
        "_batch_size",
        "_compute",
        "_dropped",
        "_latency",
        "_metrics",
        "_model",
        "_ok",
        "_queue",
        "_status",
        "_version",
        "stats",
    )

    def __init__(self, metrics: Metrics, model: str, version: str, stats: ModelStats) -> None:
        self._metrics = metrics
        self._model = model
        self._version = version
        self.stats = stats
        self._ok = metrics.requests.labels(model, version, "OK")
        self._status: dict[str, Counter] = {}
        self._latency = metrics.request_latency.labels(model, version)
        self._queue = metrics.queue_latency.labels(model, version)
        self._compute = metrics.compute_latency.labels(model, version)
        self._batch_size = metrics.batch_size.labels(model, version)
        self._batch_ok = metrics.batches.labels(model, version, "ok")
        self._batch_fail = metrics.batches.labels(model, version, "error")
        self._dropped: dict[str, Counter] = {}

    def request_done(self, seconds: float, status: str) -> None:
        ok = status == "OK"
        self.stats.request_done(seconds, ok)
        if ok:
            self._ok.inc()
            self._latency.observe(seconds)
            return
        counter = self._status.get(status)
        if counter is None:
            counter = self._status[status] = self._metrics.requests.labels(
                self._model, self._version, status
            )
        counter.inc()

    def batch_done(self, rows: int, queue_waits: Sequence[float], compute_s: float, ok: bool) -> None:
        self.stats.batch_done(rows, queue_waits, compute_s, ok)
        self._compute.observe(compute_s)
        if ok:
            self._batch_ok.inc()
            self._batch_size.observe(rows)
            observe = self._queue.observe
            for wait in queue_waits:
                observe(wait)
        else:
            self._batch_fail.inc()

    def dropped(self, reason: str, count: int) -> None:
        counter = self._dropped.get(reason)
        if counter is None:
            counter = self._dropped[reason] = self._metrics.dropped.labels(
                self._model, self._version, reason
            )
        counter.inc(count)
