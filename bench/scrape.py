"""A Prometheus /metrics endpoint read into samples (prometheus_client's own parser).

Used by the benches and by tests/support: one parse, one key shape. A sample is keyed by its
name and its labels as a sorted tuple, so `samples["batchline_requests_total", (("model",
"churn"), ...)]` reads one series and `metric(samples, name, model="churn")` sums a family.
"""

from __future__ import annotations

import urllib.request

from prometheus_client.parser import text_string_to_metric_families

Labels = tuple[tuple[str, str], ...]
Samples = dict[tuple[str, Labels], float]


def parse(text: str) -> Samples:
    """Every sample of a text exposition, {(name, sorted labels): value}."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def scrape(port: int, host: str = "127.0.0.1", timeout_s: float = 10.0) -> Samples:
    """The samples served at http://host:port/metrics."""
    url = f"http://{host}:{port}/metrics"
    with urllib.request.urlopen(url, timeout=timeout_s) as reply:
        return parse(reply.read().decode())


def metric(samples: Samples, name: str, **labels: str) -> float:
    """The sum of `name`'s samples whose labels include `labels` (0 when there are none)."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= set(ls))


def totals(samples: Samples) -> dict[str, float]:
    """Each sample name's sum over all its label sets."""
    out: dict[str, float] = {}
    for (name, _), value in samples.items():
        out[name] = out.get(name, 0.0) + value
    return out
