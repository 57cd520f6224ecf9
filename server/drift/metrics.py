"""The drift sidecar's Prometheus metrics: `SidecarCollector` exports the monitor's state,
refused calls and alert action failures at scrape time, on the sidecar's own registry.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from server.drift.alerts import AlertActions
from server.drift.monitor import DriftMonitor
from server.drift.service import TokenGuard


class SidecarCollector(Collector):
    """Exports the monitor's state at scrape time (on the event loop: see the HTTP server)."""

    _FEATURE_GAUGES = (
        ("psi", "batchline_drift_feature_psi", "PSI of a feature against its reference bins"),
        ("js_distance", "batchline_drift_feature_js_distance", "Jensen-Shannon distance (base 2)"),
        ("ks_statistic", "batchline_drift_feature_ks_statistic", "Two-sample KS statistic"),
        ("ks_pvalue", "batchline_drift_feature_ks_pvalue", "Two-sample KS p-value"),
        ("missing_rate", "batchline_drift_feature_missing_rate", "Share of missing (NaN) values"),
        (
            "out_of_range_rate",
            "batchline_drift_feature_out_of_range_rate",
            "Share of values outside the reference min..max",
        ),
    )

    def __init__(
        self,
        monitor: DriftMonitor,
        actions: AlertActions | None = None,
        guard: TokenGuard | None = None,
    ) -> None:
        self.monitor = monitor
        self.actions = actions
        self.guard = guard

    def collect(self) -> Iterator[Metric]:
        m = self.monitor
        wl = ["model", "version", "role"]
        records = CounterMetricFamily(
            "batchline_drift_records", "Prediction records received", labels=wl
        )
        rows = CounterMetricFamily("batchline_drift_rows", "Prediction rows received", labels=wl)
        window_rows = GaugeMetricFamily(
            "batchline_drift_window_rows", "Rows the last evaluation compared", labels=wl
        )
        score = {
            name: GaugeMetricFamily(f"batchline_drift_score_{name}", doc, labels=wl)
            for name, doc in (
                ("psi", "PSI of the score distribution"),
                ("js_distance", "Jensen-Shannon distance of the score distribution"),
                ("ks_statistic", "Two-sample KS statistic of the scores"),
            )
        }
        accuracy = GaugeMetricFamily(
            "batchline_drift_accuracy", "Rolling accuracy on labelled rows", labels=wl
        )
        auc = GaugeMetricFamily("batchline_drift_auc", "Rolling AUC on labelled rows", labels=wl)
        labelled = GaugeMetricFamily(
            "batchline_drift_labelled_rows", "Labelled rows in the rolling window", labels=wl
        )
        fl = [*wl, "feature"]
        features = {
            field: GaugeMetricFamily(name, doc, labels=fl)
            for field, name, doc in self._FEATURE_GAUGES
        }
        for key, records_total, rows_total, report in m.window_states():
            labels = list(key)
            records.add_metric(labels, records_total)
            rows.add_metric(labels, rows_total)
            if report is None:
                continue
            window_rows.add_metric(labels, report.window_rows)
            if report.HasField("score"):
                for name, family in score.items():
                    family.add_metric(labels, getattr(report.score, name))
            for variable in report.features:
                for field, family in features.items():
                    family.add_metric([*labels, variable.name], getattr(variable, field))
            if report.labelled_rows:
                accuracy.add_metric(labels, report.accuracy)
                auc.add_metric(labels, report.auc)
                labelled.add_metric(labels, report.labelled_rows)
        yield records
        yield rows
        yield window_rows
        yield from score.values()
        yield from features.values()
        yield accuracy
        yield auc
        yield labelled

        active = GaugeMetricFamily(
            "batchline_drift_alert_active",
            "1 while an alert rule is breached, 0 while it cools down",
            labels=["rule", "model", "version", "role", "feature"],
        )
        for alert_key, is_active in m.alert_states():
            active.add_metric(list(alert_key), 1.0 if is_active else 0.0)
        yield active
        fired = CounterMetricFamily(
            "batchline_drift_alerts_fired", "Alerts fired, by metric", labels=["metric"]
        )
        for metric, count in m.alerts_fired.items():
            fired.add_metric([metric], count)
        yield fired
        rejected = CounterMetricFamily(
            "batchline_drift_rejected_records",
            "Records not windowed, by reason (no_profile, shape, no_window)",
            labels=["reason"],
        )
        for reason, count in m.rejected.items():
            rejected.add_metric([reason], count)
        yield rejected
        label_counts = CounterMetricFamily(
            "batchline_drift_labels", "Posted labels by outcome", labels=["outcome"]
        )
        for outcome, count in m.labels.items():
            label_counts.add_metric([outcome], count)
        yield label_counts
        producers = GaugeMetricFamily(
            "batchline_drift_producer_dropped",
            "Records each producer reports it dropped (its cumulative count)",
            labels=["producer"],
        )
        for producer, count in list(m.producer_drops.items()):
            producers.add_metric([producer], count)
        yield producers
        yield CounterMetricFamily(
            "batchline_drift_evaluations", "Window evaluations", value=m.evaluations
        )
        yield CounterMetricFamily(
            "batchline_drift_evaluation_seconds",
            "Time spent evaluating windows",
            value=m.evaluation_seconds,
        )
        yield GaugeMetricFamily(
            "batchline_drift_streams", "Producer streams connected", value=m.streams
        )
        yield GaugeMetricFamily(
            "batchline_drift_pending_label_rows",
            "Prediction rows remembered for label joins",
            value=m.pending_label_rows,
        )
        yield GaugeMetricFamily(
            "batchline_drift_pending_label_bytes",
            "Bytes the remembered prediction rows are charged (at most label_memory_bytes)",
            value=m.pending_label_bytes,
        )
        evicted = CounterMetricFamily(
            "batchline_drift_label_memory_evicted",
            "Remembered predictions pushed out before their label came, by bound (rows, bytes)",
            labels=["bound"],
        )
        for bound, count in m.label_memory_evicted.items():
            evicted.add_metric([bound], count)
        yield evicted
        if self.guard is not None:
            refused = CounterMetricFamily(
                "batchline_drift_unauthenticated",
                "Calls refused for a missing or wrong token, by method",
                labels=["method"],
            )
            for method, count in self.guard.refused.items():
                refused.add_metric([method], count)
            yield refused
        if self.actions is not None:
            yield CounterMetricFamily(
                "batchline_drift_alert_action_failures",
                "Webhook or command runs that failed",
                value=self.actions.failures,
            )
