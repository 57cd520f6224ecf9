"""`DriftMonitor`: the drift sidecar's state and decisions (windows per (model, version,
role), evaluations against reference profiles, label joins, alert crossings), with the
bounds that keep its memory fixed. No I/O: profiles come from a loader, time from a clock.
"""

from __future__ import annotations

import logging
import math
import time
from array import array
from collections import OrderedDict
from collections.abc import Callable, Iterator

import numpy as np

from server._proto import drift_pb2 as pb
from server.clock import Clock, MonotonicClock
from server.drift import AlertRule, DriftSettings
from server.drift.alerts import Alert
from server.drift.profile import Histogram, ReferenceProfile
from server.drift.stats import AlertGate, Comparison, compare
from server.drift.windows import LabelWindow, RowWindow

log = logging.getLogger("server.drift.sidecar")  # the sidecar's logger, in each of its parts

ROLE_NAMES: dict[int, str] = {
    pb.ROLE_UNSPECIFIED: "unspecified",
    pb.ROLE_PRIMARY: "primary",
    pb.ROLE_CANARY: "canary",
    pb.ROLE_SHADOW: "shadow",
}
WindowKey = tuple[str, str, str]  # model, version, role
ProfileLoader = Callable[[str, str], ReferenceProfile | None]
_MAX_PRODUCERS = 1024
# Request ids longer than this (bytes) are not kept for labels: the server refuses them at
# max_request_id_bytes (256 by default); a forged record cannot fill label memory with them.
MAX_REQUEST_ID_BYTES = 1024
# Model and version names longer than this (characters) are rejected (registry names are at most 128
# characters, versions 18 digits): window keys, profile lookups and metric labels stay small.
MAX_NAME_BYTES = 256
# A producer id (host:pid) is cut to this many characters before it becomes a metric label.
MAX_PRODUCER_ID_BYTES = 256
# What one remembered prediction costs besides its request id and rows: the ordered-dict entry,
# the id's str header, the tuple and the two arrays (about 340 bytes measured with tracemalloc;
# rounded up); each row adds a score (8) and a label (8).
LABEL_ENTRY_OVERHEAD_BYTES = 384
LABEL_ROW_BYTES = 16


def _wall() -> float:
    return time.time_ns() / 1e9


class ProfileCache:
    """Reference profiles by (model, version), loaded once; a miss is retried after `retry_s`.

    Holds at most `capacity` entries (least recently used go first).
    """

    def __init__(
        self, load: ProfileLoader, clock: Clock, *, retry_s: float = 30.0, capacity: int = 256
    ) -> None:
        self._load = load
        self._clock = clock
        self._retry_s = retry_s
        self._capacity = capacity
        self._entries: OrderedDict[tuple[str, str], tuple[ReferenceProfile | None, float]] = (
            OrderedDict()
        )

    def get(self, model: str, version: str) -> ReferenceProfile | None:
        key = (model, version)
        now = self._clock.now()
        entry = self._entries.get(key)
        if entry is not None:
            profile, loaded_at = entry
            if profile is not None or now - loaded_at < self._retry_s:
                self._entries.move_to_end(key)
                return profile
        profile = self._load(model, version)
        self._entries[key] = (profile, now)
        self._entries.move_to_end(key)
        while len(self._entries) > self._capacity:
            self._entries.popitem(last=False)
        return profile


class _Window:
    __slots__ = (
        "evaluated_at",
        "key",
        "labels",
        "last_seen",
        "profile",
        "records_total",
        "report",
        "rows",
        "rows_total",
        "since_eval",
    )

    def __init__(self, key: WindowKey, profile: ReferenceProfile | None, now: float) -> None:
        self.key = key
        self.profile = profile
        self.rows: RowWindow | None = None
        self.labels: LabelWindow | None = None
        self.records_total = 0
        self.rows_total = 0
        self.since_eval = 0
        self.last_seen = now
        self.evaluated_at = -math.inf
        self.report: pb.WindowReport | None = None


def _variable(hist: Histogram, c: Comparison) -> pb.VariableDrift:
    return pb.VariableDrift(
        name=hist.name,
        psi=c.psi,
        level=c.level,
        ks_statistic=c.ks_statistic,
        ks_pvalue=c.ks_pvalue,
        js_distance=c.js_distance,
        missing_rate=c.missing_rate,
        out_of_range_rate=c.out_of_range_rate,
        count=c.count,
        edges=hist.edges.tolist(),
        reference_shares=hist.shares.tolist(),
        current_shares=c.current_shares,
    )


class DriftMonitor:
    """Windows, evaluations, label joins and alert decisions; no I/O (profiles come from a
    loader, time from the clock, alerts go to `on_alert`).

    Guarantees: bounded memory (see server.drift.sidecar's docstring); a window is evaluated
    only when it has `min_rows` rows in its time window; each alert rule fires once per crossing
    and at most once per cool-down per (rule, model, version, role, feature).
    """

    def __init__(
        self,
        settings: DriftSettings,
        profiles: ProfileLoader,
        *,
        clock: Clock | None = None,
        on_alert: Callable[[Alert], None] | None = None,
        wall: Callable[[], float] = _wall,
    ) -> None:
        self.settings = settings
        self._clock = clock or MonotonicClock()
        self._profiles = ProfileCache(profiles, self._clock)
        self._rules = settings.alert_rules()
        self._gate = AlertGate(settings.alert_cooldown_s)
        self._on_alert = on_alert or (lambda alert: None)
        self._wall = wall
        self._windows: dict[WindowKey, _Window] = {}
        self._pending: OrderedDict[str, tuple[WindowKey, array[float], array[int]]] = OrderedDict()
        self._pending_rows = 0
        self._pending_bytes = 0
        # Remembered predictions pushed out before a label came, by which bound pushed them.
        self.label_memory_evicted: dict[str, int] = {"rows": 0, "bytes": 0}
        self.producer_drops: OrderedDict[str, int] = OrderedDict()
        self._shape_warned: set[WindowKey] = set()
        self.records_total = 0
        self.rows_total = 0
        self.rejected: dict[str, int] = {}
        self.labels: dict[str, int] = {"matched": 0, "unknown": 0, "mismatched": 0}
        self.alerts_fired: dict[str, int] = {}
        self.evaluations = 0
        self.evaluation_seconds = 0.0
        self.streams = 0

    # -- ingest ------------------------------------------------------------------------------

    def ingest(self, batch: pb.PredictionBatch) -> int:
        """Take one chunk of records; returns how many it held."""
        now = self._clock.now()
        if batch.producer:
            producer = batch.producer[:MAX_PRODUCER_ID_BYTES]
            self.producer_drops[producer] = batch.dropped_total
            self.producer_drops.move_to_end(producer)
            if len(self.producer_drops) > _MAX_PRODUCERS:
                self.producer_drops.popitem(last=False)
        groups: dict[WindowKey, tuple[_Window, array[float], array[float], list[int]]] = {}
        remember = self.settings.label_memory_rows > 0
        for rec in batch.records:
            rows = rec.rows
            self.records_total += 1
            if rows <= 0:
                # A record of no rows carries nothing to compare, yet would take label memory.
                self._reject("rows")
                continue
            self.rows_total += rows
            if len(rec.model) > MAX_NAME_BYTES or len(rec.version) > MAX_NAME_BYTES:
                self._reject("name")  # no window, profile lookup or label for such a name
                continue
            key = (rec.model, rec.version, ROLE_NAMES.get(rec.role, "unspecified"))
            window = self._windows.get(key) or self._open(key, now)
            if window is None:
                self._reject("no_window")
                continue
            window.records_total += 1
            window.rows_total += rows
            window.last_seen = now
            profile = window.profile
            if profile is None:
                profile = window.profile = self._profiles.get(rec.model, rec.version)
                if profile is None:
                    self._reject("no_profile")
                    continue
            n_features = rec.n_features
            n_scores = len(rec.scores)
            if (
                n_features != profile.n_features
                or len(rec.features) != rows * n_features
                or n_scores not in (0, rows)
                or (n_features == 0 and n_scores != rows)  # rows must be backed by data
            ):
                self._reject("shape")
                if key not in self._shape_warned and len(self._shape_warned) < 1024:
                    self._shape_warned.add(key)
                    log.warning(
                        "%s:%s %s: records with %d rows, %d features, %d values, %d scores do not "
                        "fit the profile's %d features; counting them as rejected",
                        *key,
                        rows,
                        n_features,
                        len(rec.features),
                        n_scores,
                        profile.n_features,
                    )
                continue
            group = groups.get(key)
            if group is None:
                group = groups[key] = (window, array("f"), array("f"), [0])
            group[1].extend(rec.features)
            if n_scores:
                group[2].extend(rec.scores)
            else:
                group[2].extend([math.nan] * rows)
            group[3][0] += 1
            if remember and rec.request_id:
                if len(rec.request_id) > MAX_REQUEST_ID_BYTES // 4 and (
                    len(rec.request_id.encode()) > MAX_REQUEST_ID_BYTES
                ):
                    self._reject("request_id")  # the rows count; the id is not kept for labels
                else:
                    self._remember(rec.request_id, window.key, rec)
        for window, features, scores, records in groups.values():
            profile = window.profile
            assert profile is not None
            if window.rows is None:
                window.rows = RowWindow(self.settings.window_rows, profile.n_features)
            matrix = np.frombuffer(features, dtype=np.float32).reshape(-1, profile.n_features)
            window.rows.append(matrix, np.frombuffer(scores, dtype=np.float32), now)
            window.since_eval += records[0]
            every = self.settings.eval_every_records
            if (
                every
                and window.since_eval >= every
                and now - window.evaluated_at >= self.settings.eval_min_interval_s
            ):
                self._evaluate(window, now)
        return len(batch.records)

    def _open(self, key: WindowKey, now: float) -> _Window | None:
        profile = self._profiles.get(key[0], key[1])
        if len(self._windows) >= self.settings.max_windows:
            if profile is None:
                return None  # unknown traffic never pushes out a monitored window
            victim = min(self._windows.values(), key=lambda w: w.last_seen)
            self._close(victim.key)
        window = self._windows[key] = _Window(key, profile, now)
        return window

    def _close(self, key: WindowKey) -> None:
        del self._windows[key]
        self._gate.forget(lambda k: isinstance(k, tuple) and k[1:4] == key)

    def _reject(self, reason: str) -> None:
        self.rejected[reason] = self.rejected.get(reason, 0) + 1

    @staticmethod
    def _entry_bytes(request_id: str, rows: int) -> int:
        # The id as stored (1 byte a character when ASCII, up to 4 otherwise) plus its rows.
        id_bytes = len(request_id) if request_id.isascii() else 4 * len(request_id)
        return LABEL_ENTRY_OVERHEAD_BYTES + id_bytes + LABEL_ROW_BYTES * rows

    def _forget(self, request_id: str, entry: tuple[WindowKey, array[float], array[int]]) -> None:
        self._pending_rows -= len(entry[1])
        self._pending_bytes -= self._entry_bytes(request_id, len(entry[1]))

    def _remember(self, request_id: str, key: WindowKey, rec: pb.PredictionRecord) -> None:
        old = self._pending.pop(request_id, None)
        if old is not None:
            self._forget(request_id, old)
        # The window's own key (shared, not a copy per request) and compact arrays.
        scores = array("d", rec.scores) if len(rec.scores) else array("d", [math.nan] * rec.rows)
        labels = (
            array("q", rec.labels) if len(rec.labels) == rec.rows else array("q", [-1] * rec.rows)
        )
        self._pending[request_id] = (key, scores, labels)
        self._pending_rows += len(scores)
        self._pending_bytes += self._entry_bytes(request_id, len(scores))
        rows_cap = self.settings.label_memory_rows
        bytes_cap = self.settings.label_memory_bytes
        while self._pending and (self._pending_rows > rows_cap or self._pending_bytes > bytes_cap):
            reason = "rows" if self._pending_rows > rows_cap else "bytes"
            self.label_memory_evicted[reason] += 1
            self._forget(*self._pending.popitem(last=False))

    @property
    def pending_label_rows(self) -> int:
        return self._pending_rows

    @property
    def pending_label_bytes(self) -> int:
        return self._pending_bytes

    # -- labels ------------------------------------------------------------------------------

    def post_labels(self, batch: pb.LabelBatch) -> pb.LabelAck:
        ack = pb.LabelAck()
        for label in batch.labels:
            entry = self._pending.pop(label.request_id, None)
            if entry is None:
                ack.unknown += 1
                continue
            key, scores, predicted = entry
            self._forget(label.request_id, entry)
            window = self._windows.get(key)
            if window is None:
                ack.unknown += 1
                continue
            if len(label.labels) != len(scores):
                ack.mismatched += 1
                continue
            if window.labels is None:
                window.labels = LabelWindow(self.settings.label_window_rows)
            window.labels.append(predicted, label.labels, scores)
            window.since_eval += 1
            ack.matched += 1
        self.labels["matched"] += ack.matched
        self.labels["unknown"] += ack.unknown
        self.labels["mismatched"] += ack.mismatched
        return ack

    # -- evaluation --------------------------------------------------------------------------

    def tick(self) -> None:
        """The periodic evaluation: windows with news, or whose oldest rows aged out, and not
        evaluated for `eval_every_s`."""
        now = self._clock.now()
        window_s = self.settings.window_s
        for window in list(self._windows.values()):
            if now - window.evaluated_at < self.settings.eval_every_s:
                continue
            aged = (
                window_s > 0 and window.rows is not None and window.rows.oldest() < now - window_s
            )
            if window.since_eval > 0 or aged:
                self._evaluate(window, now)

    def evaluate_all(self, *, only_dirty: bool = True) -> None:
        now = self._clock.now()
        for window in list(self._windows.values()):
            if window.since_eval > 0 or not only_dirty:
                self._evaluate(window, now)

    def _evaluate(self, window: _Window, now: float) -> None:
        started = time.perf_counter()
        window.since_eval = 0
        window.evaluated_at = now
        model, version, role = window.key
        report = pb.WindowReport(
            model=model,
            version=version,
            role=role,
            evaluated_unix_s=self._wall(),
            has_profile=window.profile is not None,
            accuracy=math.nan,
            auc=math.nan,
        )
        values: dict[str, list[tuple[str, float]]] = {}

        def put(metric: str, feature: str, value: float) -> None:
            values.setdefault(metric, []).append((feature, value))

        profile = window.profile
        if profile is not None and window.rows is not None:
            since = now - self.settings.window_s if self.settings.window_s > 0 else -math.inf
            features, scores = window.rows.view(since)
            report.window_rows = scores.shape[0]
            if scores.shape[0] >= max(1, self.settings.min_rows):
                for j, hist in enumerate(profile.features):
                    c = compare(hist, features[:, j])
                    report.features.append(_variable(hist, c))
                    put("feature_psi", hist.name, c.psi)
                    put("feature_js", hist.name, c.js_distance)
                    put("feature_ks", hist.name, c.ks_statistic)
                    put("feature_ks_pvalue", hist.name, c.ks_pvalue)
                    put("missing_rate", hist.name, c.missing_rate)
                    put("out_of_range_rate", hist.name, c.out_of_range_rate)
                c = compare(profile.score, scores)
                report.score.CopyFrom(_variable(profile.score, c))
                put("score_psi", "score", c.psi)
                put("score_js", "score", c.js_distance)
                put("score_ks", "score", c.ks_statistic)
        if window.labels is not None:
            report.labelled_rows = window.labels.size
            report.accuracy = window.labels.accuracy()
            report.auc = window.labels.auc()
            if window.labels.size >= max(1, self.settings.min_rows):
                put("accuracy", "", report.accuracy)
                put("auc", "", report.auc)
        for rule in self._rules:
            for feature, value in values.get(rule.metric, ()):
                self._check(rule, window.key, feature, value, now)
        report.active_alerts.extend(self._active_alerts(window.key))
        window.report = report
        self.evaluations += 1
        self.evaluation_seconds += time.perf_counter() - started

    def _check(
        self, rule: AlertRule, key: WindowKey, feature: str, value: float, now: float
    ) -> None:
        gate_key = (str(rule), *key, feature)
        if not self._gate.update(gate_key, rule.breached(value), now):
            return
        self.alerts_fired[rule.metric] = self.alerts_fired.get(rule.metric, 0) + 1
        alert = Alert(
            rule=str(rule),
            metric=rule.metric,
            value=value,
            threshold=rule.threshold,
            model=key[0],
            version=key[1],
            role=key[2],
            feature=feature,
            at_unix_s=self._wall(),
        )
        try:
            self._on_alert(alert)
        except Exception:
            log.exception("drift alert action failed")

    def _active_alerts(self, key: WindowKey) -> list[str]:
        out = []
        for gate_key, active in self._gate.known():
            assert isinstance(gate_key, tuple)
            if active and gate_key[1:4] == key:
                rule, feature = gate_key[0], gate_key[4]
                out.append(f"{rule}[{feature}]" if feature else str(rule))
        return sorted(out)

    def alert_states(self) -> Iterator[tuple[tuple[str, ...], bool]]:
        """(rule, model, version, role, feature) of every alert active or cooling down."""
        for gate_key, active in self._gate.known():
            assert isinstance(gate_key, tuple)
            yield tuple(str(part) for part in gate_key), active

    # -- reading -----------------------------------------------------------------------------

    def window_states(self) -> list[tuple[WindowKey, int, int, pb.WindowReport | None]]:
        """(key, records_total, rows_total, last evaluation) of every window."""
        return [(key, w.records_total, w.rows_total, w.report) for key, w in self._windows.items()]

    def report(
        self, model: str = "", version: str = "", *, refresh: bool = False
    ) -> pb.DriftReport:
        if refresh:
            self.evaluate_all(only_dirty=True)
        out = pb.DriftReport(
            generated_unix_s=self._wall(),
            records_total=self.records_total,
            rejected_total=sum(self.rejected.values()),
            alerts_fired_total=sum(self.alerts_fired.values()),
        )
        for key, window in sorted(self._windows.items()):
            if (model and key[0] != model) or (version and key[1] != version):
                continue
            entry = out.windows.add()
            if window.report is not None:
                entry.CopyFrom(window.report)
            else:
                entry.model, entry.version, entry.role = key[0], key[1], key[2]
                entry.has_profile = window.profile is not None
                entry.accuracy = entry.auc = math.nan
            entry.records_total = window.records_total
            entry.rows_total = window.rows_total
        return out
