"""Prometheus metrics, registered on a CollectorRegistry owned by one server instance.

The per-request metrics are touched only from the event loop thread, so they are kept in
`LoopHistogram` / `LoopCounter`: plain lists and a bisect, no lock, about a quarter of
prometheus_client's `observe()` cost. The scrape thread reads them (under the GIL a scrape sees
each value whole; a sum and its count may differ by the observation in flight). Children are
bound once per model version; queue depth is read at scrape time, not per request.
"""

from __future__ import annotations

import logging
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.registry import Collector

from server.observability.stats import ModelStats

log = logging.getLogger("server.breaker")
_BREAKER_STATES = {"CLOSED": 0, "OPEN": 1, "HALF_OPEN": 2, "FORCED_OPEN": 3, "DISABLED": 4}

# Sub-millisecond work needs sub-millisecond buckets.
LATENCY_BUCKETS = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.00075, 0.001, 0.0025, 0.005, 0.0075,
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
)  # fmt: skip
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class _HistogramChild:
    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: list[float]) -> None:
        self.bounds = bounds
        self.counts = [0] * len(bounds)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value


class LoopHistogram(Collector):
    """A labelled histogram for one thread's hot path (see the module docstring)."""

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str],
        buckets: Sequence[float],
        registry: CollectorRegistry,
    ) -> None:
        self._name = name
        self._doc = documentation
        self._labelnames = list(labelnames)
        self._bounds = [float(b) for b in buckets] + [float("inf")]
        self._children: dict[tuple[str, ...], _HistogramChild] = {}
        registry.register(self)

    def forget(self, *prefix: str) -> None:
        """Drop every series whose first label values are `prefix` (a retired version)."""
        for values in [v for v in self._children if v[: len(prefix)] == prefix]:
            del self._children[values]

    def labels(self, *values: str) -> _HistogramChild:
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = _HistogramChild(self._bounds)
        return child

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(self._name, self._doc, labels=self._labelnames)
        for values, child in list(self._children.items()):
            counts = list(child.counts)
            cumulative = []
            total = 0
            for bound, count in zip(self._bounds, counts, strict=True):
                total += count
                cumulative.append((_bound(bound), total))
            family.add_metric(list(values), cumulative, child.sum)
        yield family

    def describe(self) -> Iterator[Metric]:
        yield HistogramMetricFamily(self._name, self._doc, labels=self._labelnames)


class _CounterChild:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount


class LoopCounter(Collector):
    """A labelled counter for one thread's hot path (see the module docstring)."""

    def __init__(
        self, name: str, documentation: str, labelnames: Sequence[str], registry: CollectorRegistry
    ) -> None:
        self._name = name
        self._doc = documentation
        self._labelnames = list(labelnames)
        self._children: dict[tuple[str, ...], _CounterChild] = {}
        registry.register(self)

    def forget(self, *prefix: str) -> None:
        """Drop every series whose first label values are `prefix` (a retired version)."""
        for values in [v for v in self._children if v[: len(prefix)] == prefix]:
            del self._children[values]

    def labels(self, *values: str) -> _CounterChild:
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = _CounterChild()
        return child

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(self._name, self._doc, labels=self._labelnames)
        for values, child in list(self._children.items()):
            family.add_metric(list(values), child.value)
        yield family

    def describe(self) -> Iterator[Metric]:
        yield CounterMetricFamily(self._name, self._doc, labels=self._labelnames)


def _bound(value: float) -> str:
    return "+Inf" if value == float("inf") else repr(value)


class Metrics:
    """The metric families of one server instance."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = LoopCounter(
            "batchline_requests",
            "Inference requests by model, version, outcome (a gRPC status name) and protocol "
            "(grpc or http)",
            ["model", "version", "status", "protocol"],
            registry=r,
        )
        self.request_latency = LoopHistogram(
            "batchline_request_duration_seconds",
            "Time from a validated request to its result, in the server, by protocol",
            ["model", "version", "protocol"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_latency = LoopHistogram(
            "batchline_queue_duration_seconds",
            "Time a request waited in its model's queue before its batch ran",
            ["model", "version"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.compute_latency = LoopHistogram(
            "batchline_compute_duration_seconds",
            "Time one batch spent in the model",
            ["model", "version"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = LoopHistogram(
            "batchline_batch_size_rows",
            "Rows per executed batch",
            ["model", "version"],
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.batches = LoopCounter(
            "batchline_batches",
            "Executed batches by outcome",
            ["model", "version", "outcome"],
            registry=r,
        )
        self.dropped = LoopCounter(
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
        self.reloads = Counter(
            "batchline_model_reloads",
            "Model version swaps completed",
            ["model"],
            registry=r,
        )
        self.reload_failures = Counter(
            "batchline_model_reload_failures",
            "Reloads refused or failed (the old version kept serving)",
            ["model"],
            registry=r,
        )
        self.breaker_state = Gauge(
            "batchline_breaker_state",
            "Circuit breaker state: 0 closed, 1 open, 2 half-open, 3 forced open, 4 disabled",
            ["breaker"],
            registry=r,
        )
        self.breaker_transitions = Counter(
            "batchline_breaker_transitions",
            "Circuit breaker state changes",
            ["breaker", "from_state", "to_state"],
            registry=r,
        )
        self.fallbacks = LoopCounter(
            "batchline_fallbacks",
            "Requests answered by a fallback while a breaker was open",
            ["model", "version", "kind"],
            registry=r,
        )
        self.model_info = Gauge(
            "batchline_model_info",
            "Served model versions (value 1), with their alias and artifact sha256",
            ["model", "version", "alias", "sha256"],
            registry=r,
        )

    def breaker_created(self, name: str) -> None:
        self.breaker_state.labels(name).set(0)

    def breaker_transition(self, t: Any) -> None:
        """One log line and a metric per breaker transition."""
        self.breaker_state.labels(t.name).set(_BREAKER_STATES.get(t.to_state.name, -1))
        self.breaker_transitions.labels(t.name, t.from_state.name, t.to_state.name).inc()
        log.warning(
            "circuit breaker %s: %s -> %s (%s; failure rate %.1f%%, slow-call rate %.1f%%)",
            t.name,
            t.from_state.name,
            t.to_state.name,
            t.reason,
            t.failure_rate,
            t.slow_call_rate,
        )

    def forget_version(self, model: str, version: str) -> None:
        """Remove every series of one model version (retired, or refused at load): its gauges'
        callbacks (which hold the version's batcher) go with them, and queries over
        `batchline_model_info` see only what is served."""
        for metric in vars(self).values():
            if isinstance(metric, LoopHistogram | LoopCounter):
                metric.forget(model, version)
            elif isinstance(metric, MetricWrapperBase) and tuple(metric._labelnames[:2]) == (
                "model",
                "version",
            ):
                with metric._lock:
                    keys = [k for k in metric._metrics if k[:2] == (model, version)]
                for key in keys:
                    metric.remove(*key)

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
        "_http_latency",
        "_http_ok",
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
        self._ok = metrics.requests.labels(model, version, "OK", "grpc")
        self._status: dict[tuple[str, str], _CounterChild] = {}
        self._latency = metrics.request_latency.labels(model, version, "grpc")
        self._http_ok = metrics.requests.labels(model, version, "OK", "http")
        self._http_latency = metrics.request_latency.labels(model, version, "http")
        self._queue = metrics.queue_latency.labels(model, version)
        self._compute = metrics.compute_latency.labels(model, version)
        self._batch_size = metrics.batch_size.labels(model, version)
        self._batch_ok = metrics.batches.labels(model, version, "ok")
        self._batch_fail = metrics.batches.labels(model, version, "error")
        self._dropped: dict[str, _CounterChild] = {}

    def request_done(self, seconds: float, status: str, protocol: str = "grpc") -> None:
        ok = status == "OK"
        self.stats.request_done(seconds, ok)
        if ok:
            if protocol == "grpc":
                self._ok.inc()
                self._latency.observe(seconds)
            else:
                self._http_ok.inc()
                self._http_latency.observe(seconds)
            return
        counter = self._status.get((status, protocol))
        if counter is None:
            counter = self._status[status, protocol] = self._metrics.requests.labels(
                self._model, self._version, status, protocol
            )
        counter.inc()

    def batch_done(
        self, rows: int, queue_waits: Sequence[float], compute_s: float, ok: bool
    ) -> None:
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

    def fallback(self, kind: str) -> None:
        self._metrics.fallbacks.labels(self._model, self._version, kind).inc()

    def dropped(self, reason: str, count: int) -> None:
        counter = self._dropped.get(reason)
        if counter is None:
            counter = self._dropped[reason] = self._metrics.dropped.labels(
                self._model, self._version, reason
            )
        counter.inc(count)


class MirrorCollector(Collector):
    """Shadow mirroring counters per model, read from the mirrors at scrape time."""

    _OUTCOMES = ("offered", "shed_full", "shed_load", "completed", "failed")

    def __init__(self, mirrors: Callable[[], Iterable[Any]]) -> None:
        # Called at scrape time: the mirrors (server/shadow/mirror.ShadowMirror) there are now.
        self._mirrors = mirrors

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(
            "batchline_shadow_requests",
            "Mirrored requests per model by outcome (offered, shed_full, shed_load, completed, failed)",
            labels=["model", "outcome"],
        )
        for mirror in self._mirrors():
            counts = mirror.counters.as_dict()
            for outcome in self._OUTCOMES:
                family.add_metric([mirror.name, outcome], counts[outcome])
        yield family

    def describe(self) -> Iterator[Metric]:
        yield CounterMetricFamily("batchline_shadow_requests", "", labels=["model", "outcome"])


class PairLogCollector(Collector):
    """The shadow pair log's memory and what its bounds pushed out, read at scrape time."""

    def __init__(self, pair_log: Any) -> None:
        self._log = pair_log

    def collect(self) -> Iterator[Metric]:
        evicted = CounterMetricFamily(
            "batchline_shadow_pairs_evicted",
            "Shadow pairs pushed out of memory, by bound (pairs: shadow_log_max_pairs, bytes: "
            "shadow_log_max_memory_bytes)",
            labels=["bound"],
        )
        for bound, count in self._log.evicted.items():
            evicted.add_metric([bound], count)
        yield evicted
        yield GaugeMetricFamily(
            "batchline_shadow_pairs_memory_bytes",
            "Bytes the shadow pairs held in memory are charged",
            value=self._log.memory_bytes,
        )

    def describe(self) -> Iterator[Metric]:
        return iter(())


class DriftProducerCollector(Collector):
    """The drift producer's counters, read at scrape time."""

    _OUTCOMES = ("sent", "dropped_full", "dropped_disconnected", "sampled_out", "errors")

    def __init__(self, producer: Any) -> None:
        self._producer = producer

    def collect(self) -> Iterator[Metric]:
        counts = self._producer.counters()
        records = CounterMetricFamily(
            "batchline_drift_producer_records",
            "Prediction records for the drift sidecar by outcome",
            labels=["outcome"],
        )
        for outcome in self._OUTCOMES:
            records.add_metric([outcome], counts[outcome])
        yield records
        yield CounterMetricFamily(
            "batchline_drift_producer_reconnects",
            "Reconnections of the stream to the drift sidecar",
            value=counts["reconnects"],
        )
        yield GaugeMetricFamily(
            "batchline_drift_producer_queue",
            "Records waiting to be streamed to the drift sidecar",
            value=counts["pending"],
        )
        yield GaugeMetricFamily(
            "batchline_drift_producer_queue_bytes",
            "Bytes the waiting records are charged (at most drift.max_queue_bytes)",
            value=counts["pending_bytes"],
        )
        yield GaugeMetricFamily(
            "batchline_drift_producer_connected",
            "1 while the stream to the drift sidecar is up",
            value=1.0 if self._producer.connected else 0.0,
        )

    def describe(self) -> Iterator[Metric]:
        return iter(())


class FeatureMetrics:
    """Feature-store round trips (the lookup's observer) and per-model feature outcomes."""

    def __init__(self, registry: CollectorRegistry, store: str) -> None:
        self.store = store  # the `store` label of every series here
        self.round_trips = LoopCounter(
            "batchline_feature_round_trips",
            "Feature store round trips by outcome",
            ["store", "outcome"],
            registry=registry,
        )
        self.keys = LoopCounter(
            "batchline_feature_rows_fetched",
            "Entity rows asked of the feature store",
            ["store"],
            registry=registry,
        )
        self.round_trip_latency = LoopHistogram(
            "batchline_feature_round_trip_seconds",
            "Time of one feature store round trip",
            ["store"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.fetch_latency = LoopHistogram(
            "batchline_feature_fetch_duration_seconds",
            "Time a request spent getting its features (queueing for a round trip included)",
            ["model", "version"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.defaulted_rows = LoopCounter(
            "batchline_feature_defaulted_rows",
            "Rows served with the view's defaults, by reason (missing, store_error)",
            ["model", "version", "reason"],
            registry=registry,
        )
        self.filled_values = LoopCounter(
            "batchline_feature_filled_values",
            "Single feature values that were missing or not a number and got their default",
            ["model", "version"],
            registry=registry,
        )
        self._ok = self.round_trips.labels(store, "ok")
        self._error = self.round_trips.labels(store, "error")
        self._keys = self.keys.labels(store)
        self._rt = self.round_trip_latency.labels(store)

    def round_trip(self, keys: int, seconds: float, ok: bool) -> None:
        (self._ok if ok else self._error).inc()
        self._keys.inc(keys)
        self._rt.observe(seconds)

    def fetched(self, key: Any, rows: int, seconds: float) -> None:
        self.fetch_latency.labels(key.name, key.version).observe(seconds)

    def defaulted(self, key: Any, rows: int, reason: str) -> None:
        self.defaulted_rows.labels(key.name, key.version, reason).inc(rows)

    def filled(self, key: Any, values: int) -> None:
        self.filled_values.labels(key.name, key.version).inc(values)
