"""Metrics of `--workers N`: the parent process serves one endpoint that merges its workers'.

Each worker keeps its own collectors (lock-free, per event loop) on an internal port; a scrape of
the parent fetches every worker's page and merges samples with the same name and labels:
counters and histograms add up, and so do gauges, except those that describe state rather than
quantity (model info, breaker state, connection state), which take the maximum.
"""

from __future__ import annotations

import logging
import urllib.request
from collections.abc import Iterator, Sequence

from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

_STATE_GAUGES = frozenset(
    {"batchline_model_info", "batchline_breaker_state", "batchline_drift_producer_connected"}
)


class WorkerMetrics(Collector):
    """Collects by scraping the workers' internal metrics endpoints and merging them."""

    def __init__(
        self, ports: Sequence[int], host: str = "127.0.0.1", timeout_s: float = 2.0
    ) -> None:
        self._urls = [f"http://{host}:{port}/metrics" for port in ports]
        self._timeout = timeout_s

    def _pages(self) -> Iterator[str]:
        for url in self._urls:
            try:
                with urllib.request.urlopen(url, timeout=self._timeout) as reply:
                    yield reply.read().decode()
            except OSError as exc:  # a worker restarting: report the others
                log.warning("metrics of worker %s unavailable: %s", url, exc)

    def collect(self) -> Iterator[Metric]:
        merged: dict[str, Metric] = {}
        values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
        for page in self._pages():
            for family in text_string_to_metric_families(page):
                if family.name not in merged:
                    merged[family.name] = Metric(family.name, family.documentation, family.type)
                    values[family.name] = {}
                samples = values[family.name]
                keep_max = family.type == "gauge" and family.name in _STATE_GAUGES
                for sample in family.samples:
                    key = (sample.name, tuple(sorted(sample.labels.items())))
                    if key in samples:
                        old = samples[key]
                        samples[key] = max(old, sample.value) if keep_max else old + sample.value
                    else:
                        samples[key] = sample.value
        for name, metric in merged.items():
            for (sample_name, labels), value in values[name].items():
                metric.add_sample(sample_name, dict(labels), value)
            yield metric

    def describe(self) -> Iterator[Metric]:
        return iter(())
