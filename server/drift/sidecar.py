"""The drift sidecar (`batchline drift`): its own process, so the serving path computes nothing.

gRPC (DriftService, default port 8011) takes the producers' record streams, label posts and
report requests; HTTP (default port 8012) serves Prometheus metrics on their own registry
(`/metrics`), the report as an HTML page (`/report`) and as JSON (`/report.json`).

Per (model, version, role) a `RowWindow` keeps the last `window_rows` rows and their arrival
times; an evaluation looks at the rows of the last `window_s` seconds among them (0: no time
limit) and compares each feature and the score with the version's reference profile. Windows are
evaluated every `eval_every_records` records (but not twice within `eval_min_interval_s`) or
every `eval_every_s` seconds, never per record.
Labels posted back by request id join a bounded memory of recent predictions and feed a rolling
accuracy and AUC. Memory is bounded whatever the traffic: at most `max_windows` windows of fixed
size, `label_memory_rows` remembered prediction rows taking at most `label_memory_bytes`, ids and
names of bounded size (longer ones are rejected and counted), and bounded caches.

Trust: both listeners bind 127.0.0.1 unless told otherwise (`host` for gRPC, `http_host` for
HTTP; the sidecar shares the pod with its server). With a shared token (`token_file`,
BATCHLINE_DRIFT_TOKEN) Record, PostLabels and a refreshing Report need `authorization: Bearer
TOKEN` (else UNAUTHENTICATED), and so does an HTTP `?refresh=1` (else 401); without one, a
listener off loopback is warned about at start-up, and HTTP refreshes off loopback are refused
(403): the page still serves the last evaluation. /metrics, /report and /healthz stay open to
read (a Prometheus scrape carries no token).

Everything runs on one event loop (the HTTP endpoint is asyncio too), so no state is shared
between threads.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hmac
import json
import logging
import math
import os
import shlex
import signal
import sys
import time
import urllib.request
from array import array
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import grpc
import numpy as np
import numpy.typing as npt
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector

from registry_client import FileRegistry, RegistryError
from server._proto import drift_pb2 as pb
from server._proto import drift_pb2_grpc as pb_grpc
from server.clock import Clock, MonotonicClock
from server.drift import (
    AlertRule,
    DriftSettings,
    add_arguments,
    check_settings,
    is_loopback,
    settings_from_args,
)
from server.drift.producer import ACCEPTED_KEY
from server.drift.profile import PROFILE_FILE, Histogram, ReferenceProfile
from server.drift.report import render_html, report_to_dict
from server.drift.stats import AlertGate, Comparison, compare, roc_auc
from server.errors import ConfigError
from server.readiness import write_ready_file

log = logging.getLogger("server.drift.sidecar")  # also when run as __main__

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
_HTTP_TIMEOUT_S = 10.0
# Refused calls are logged at most this often (with the count since the last line).
_REFUSAL_LOG_EVERY_S = 60.0


def _wall() -> float:
    return time.time_ns() / 1e9


# -- windows ---------------------------------------------------------------------------------


class RowWindow:
    """The last `capacity` rows (features and score) of one window key, with arrival times."""

    def __init__(self, capacity: int, n_features: int) -> None:
        self.capacity = capacity
        self.features = np.full((capacity, n_features), np.nan, dtype=np.float32)
        self.scores = np.full(capacity, np.nan, dtype=np.float32)
        self.times = np.full(capacity, -np.inf)
        self.size = 0
        self._next = 0

    def append(
        self, features: npt.NDArray[np.float32], scores: npt.NDArray[np.float32], now: float
    ) -> None:
        n = scores.shape[0]
        if n >= self.capacity:
            self.features[:] = features[-self.capacity :]
            self.scores[:] = scores[-self.capacity :]
            self.times[:] = now
            self.size, self._next = self.capacity, 0
            return
        start = self._next
        first = min(n, self.capacity - start)
        self.features[start : start + first] = features[:first]
        self.scores[start : start + first] = scores[:first]
        self.times[start : start + first] = now
        rest = n - first
        if rest:
            self.features[:rest] = features[first:]
            self.scores[:rest] = scores[first:]
            self.times[:rest] = now
        self._next = (start + n) % self.capacity
        self.size = min(self.capacity, self.size + n)

    def view(self, since: float) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
        """Rows that arrived at `since` or later (the filled part is always [0, size))."""
        mask = self.times[: self.size] >= since
        return self.features[: self.size][mask], self.scores[: self.size][mask]

    def oldest(self) -> float:
        return float(self.times[: self.size].min()) if self.size else math.inf


class LabelWindow:
    """The last `capacity` labelled rows: predicted label (-1: none), true label, score."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.predicted = np.full(capacity, -1, dtype=np.int64)
        self.truth = np.zeros(capacity, dtype=np.int64)
        self.scores = np.full(capacity, np.nan, dtype=np.float64)
        self.size = 0
        self._next = 0

    def append(
        self, predicted: Sequence[int], truth: Sequence[int], scores: Sequence[float]
    ) -> None:
        for p, t, s in zip(predicted, truth, scores, strict=True):
            i = self._next
            self.predicted[i], self.truth[i], self.scores[i] = p, t, s
            self._next = (i + 1) % self.capacity
            self.size = min(self.capacity, self.size + 1)

    def accuracy(self) -> float:
        have = self.predicted[: self.size] >= 0
        if not have.any():
            return math.nan
        return float(np.mean(self.predicted[: self.size][have] == self.truth[: self.size][have]))

    def auc(self) -> float:
        scores = self.scores[: self.size]
        finite = np.isfinite(scores)
        return roc_auc(self.truth[: self.size][finite], scores[finite])


# -- profiles and alerts ---------------------------------------------------------------------


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


def registry_profiles(root: str | Path) -> ProfileLoader:
    """Load `profile.json` attachments from a FileRegistry; None (logged) when absent."""
    registry = FileRegistry(root)

    def load(model: str, version: str) -> ReferenceProfile | None:
        try:
            path = registry.attachment(model, version, PROFILE_FILE)
            return ReferenceProfile.from_json(path.read_bytes())
        except (RegistryError, OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("no reference profile for %s:%s: %s", model, version, exc)
            return None

    return load


@dataclass(frozen=True, slots=True)
class Alert:
    """One threshold crossing."""

    rule: str
    metric: str
    value: float
    threshold: float
    model: str
    version: str
    role: str
    feature: str
    at_unix_s: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "event": "drift_alert",
            "rule": self.rule,
            "metric": self.metric,
            "value": self.value,
            "threshold": self.threshold,
            "model": self.model,
            "version": self.version,
            "role": self.role,
            "feature": self.feature,
            "at_unix_s": self.at_unix_s,
        }


class AlertActions:
    """What a fired alert does: one JSON log line, then (optionally) a webhook POST and a
    command run with the alert in $BATCHLINE_ALERT. Actions run in the background, at most
    `max_in_flight` at once (more are skipped and logged), each bounded by `timeout_s`."""

    def __init__(
        self,
        webhook: str = "",
        command: str = "",
        *,
        timeout_s: float = 10.0,
        max_in_flight: int = 8,
    ) -> None:
        self.webhook = webhook
        self.command = shlex.split(command) if command else []
        self.timeout_s = timeout_s
        self.max_in_flight = max_in_flight
        self.failures = 0
        self.skipped = 0
        self._tasks: set[asyncio.Task[None]] = set()

    def __call__(self, alert: Alert) -> None:
        payload = json.dumps(alert.to_dict())
        log.warning(
            "drift alert %s: %s=%.4g (threshold %g) on %s:%s %s %s",
            alert.rule,
            alert.metric,
            alert.value,
            alert.threshold,
            alert.model,
            alert.version,
            alert.role,
            alert.feature,
            extra={"model": alert.model, "version": alert.version},
        )
        if self.webhook:
            self._spawn(self._post(payload))
        if self.command:
            self._spawn(self._run(payload))

    def _spawn(self, coro: Any) -> None:
        if len(self._tasks) >= self.max_in_flight:
            coro.close()
            self.skipped += 1
            log.warning("drift alert action skipped: %d already running", len(self._tasks))
            return
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _post(self, payload: str) -> None:
        def post() -> None:
            request = urllib.request.Request(
                self.webhook,
                data=payload.encode(),
                headers={"Content-Type": "application/json"},
                method="POST",
            )
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                response.read()

        try:
            await asyncio.to_thread(post)
        except Exception as exc:
            self.failures += 1
            log.warning("drift alert webhook %s failed: %s", self.webhook, exc)

    async def _run(self, payload: str) -> None:
        try:
            proc = await asyncio.create_subprocess_exec(
                *self.command,
                env={**os.environ, "BATCHLINE_ALERT": payload},
                stdin=asyncio.subprocess.DEVNULL,
            )
        except OSError as exc:
            self.failures += 1
            log.warning("drift alert command %s failed to start: %s", self.command[0], exc)
            return
        try:
            code = await asyncio.wait_for(proc.wait(), self.timeout_s)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            code = -9
        if code != 0:
            self.failures += 1
            log.warning("drift alert command %s exited with %s", self.command[0], code)

    async def close(self, grace_s: float = 5.0) -> None:
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=grace_s)
        for task in list(self._tasks):
            task.cancel()


# -- the monitor -----------------------------------------------------------------------------


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

    Guarantees: bounded memory (see the module docstring); a window is evaluated only when it
    has `min_rows` rows in its time window; each alert rule fires once per crossing and at most
    once per cool-down per (rule, model, version, role, feature).
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


# -- metrics ---------------------------------------------------------------------------------


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


# -- transport -------------------------------------------------------------------------------


class TokenGuard:
    """Who may change the sidecar's state: with a token, only calls carrying it (gRPC metadata
    or HTTP header `authorization: Bearer TOKEN`, compared with hmac.compare_digest); without
    one, anyone who can reach the listener. Counts and logs (at most once a minute) refusals."""

    def __init__(self, token: str, clock: Clock | None = None) -> None:
        self._token = token.encode()
        self._clock = clock or MonotonicClock()
        self.refused: dict[str, int] = {}
        self._logged_at = -math.inf
        self._unlogged = 0

    @property
    def enabled(self) -> bool:
        return bool(self._token)

    def allows(self, authorization: str | None) -> bool:
        if not self._token:
            return True
        if not authorization:
            return False
        scheme, _, given = authorization.strip().partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(
            given.strip().encode(), self._token
        )

    def allows_grpc(self, context: Any) -> bool:
        if not self._token:
            return True
        for key, value in context.invocation_metadata() or ():
            if key == "authorization" and isinstance(value, str):
                return self.allows(value)
        return False

    def refuse(self, method: str, peer: str) -> None:
        self.refused[method] = self.refused.get(method, 0) + 1
        self._unlogged += 1
        now = self._clock.now()
        if now - self._logged_at >= _REFUSAL_LOG_EVERY_S:
            log.warning(
                "drift sidecar refused %d call(s) without the right token (latest: %s from %s)",
                self._unlogged,
                method,
                peer or "unknown peer",
            )
            self._logged_at = now
            self._unlogged = 0


_UNAUTHENTICATED = "the drift sidecar needs metadata authorization: Bearer <token> ([drift] token)"


class DriftServicer:
    """DriftService over the monitor: each method checks the token (when one is configured),
    then only converts and delegates."""

    def __init__(self, monitor: DriftMonitor, guard: TokenGuard | None = None) -> None:
        self.monitor = monitor
        self.guard = guard or TokenGuard("")

    async def _check(self, method: str, context: Any) -> None:
        if self.guard.allows_grpc(context):
            return
        self.guard.refuse(method, context.peer())
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, _UNAUTHENTICATED)

    async def Record(self, request_iterator: Any, context: Any) -> pb.RecordAck:
        await self._check("Record", context)
        # Tells the producer the stream is accepted: it counts as connected only from here.
        await context.send_initial_metadata(((ACCEPTED_KEY, "1"),))
        received = 0
        self.monitor.streams += 1
        try:
            async for batch in request_iterator:
                received += self.monitor.ingest(batch)
        finally:
            self.monitor.streams -= 1
        return pb.RecordAck(received=received)

    async def PostLabels(self, request: pb.LabelBatch, context: Any) -> pb.LabelAck:
        await self._check("PostLabels", context)
        return self.monitor.post_labels(request)

    async def Report(self, request: pb.ReportRequest, context: Any) -> pb.DriftReport:
        if request.refresh:  # evaluating now changes state (alerts may fire); reading does not
            await self._check("Report", context)
        return self.monitor.report(request.model, request.version, refresh=request.refresh)


class Sidecar:
    """One drift sidecar: the monitor, its gRPC server, HTTP endpoint and periodic evaluation."""

    def __init__(
        self,
        settings: DriftSettings,
        *,
        profiles: ProfileLoader | None = None,
        clock: Clock | None = None,
    ) -> None:
        check_settings(settings)
        self.settings = settings
        if profiles is None:
            profiles = registry_profiles(settings.registry) if settings.registry else _no_profiles
        self.actions = AlertActions(settings.alert_webhook, settings.alert_command)
        self.monitor = DriftMonitor(settings, profiles, clock=clock, on_alert=self.actions)
        self.guard = TokenGuard(settings.resolved_token(), clock)
        self.http_host = settings.http_host or settings.host
        self.registry = CollectorRegistry()
        self.registry.register(SidecarCollector(self.monitor, self.actions, self.guard))
        self.grpc_port = 0
        self.http_port = 0
        self._grpc: Any = None
        self._http: asyncio.Server | None = None
        self._tick: asyncio.Task[None] | None = None

    async def start(self) -> None:
        s = self.settings
        self._grpc = grpc.aio.server(
            options=[
                # A second sidecar must fail to bind, not share the port.
                ("grpc.so_reuseport", 0),
                ("grpc.max_receive_message_length", 64 * 1024 * 1024),
                ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
            ]
        )
        pb_grpc.add_DriftServiceServicer_to_server(
            DriftServicer(self.monitor, self.guard), self._grpc
        )
        self.grpc_port = self._grpc.add_insecure_port(f"{s.host}:{s.grpc_port}")
        if self.grpc_port == 0:
            raise OSError(f"cannot bind the drift gRPC port {s.host}:{s.grpc_port}")
        await self._grpc.start()
        self._http = await asyncio.start_server(
            self._serve_http, self.http_host or None, s.http_port
        )
        self.http_port = self._http.sockets[0].getsockname()[1]
        self._tick = asyncio.get_running_loop().create_task(self._ticker(), name="drift-tick")
        log.info(
            "drift sidecar: gRPC on %s:%d, HTTP (metrics, /report) on %s:%d, token %s",
            s.host or "every address",
            self.grpc_port,
            self.http_host or "every address",
            self.http_port,
            "required" if self.guard.enabled else "not set",
        )
        if not self.guard.enabled and not is_loopback(s.host):
            log.warning(
                "drift sidecar: gRPC listens on %s without a token: anyone who reaches it can "
                "stream records and post labels (forged records fire alerts and run "
                "alert_command); set BATCHLINE_DRIFT_TOKEN or --token-file on both ends, or "
                "--host 127.0.0.1",
                s.host or "every address",
            )
        if not self.guard.enabled and not is_loopback(self.http_host):
            log.warning(
                "drift sidecar: HTTP listens on %s without a token: /metrics and /report are "
                "open to read, ?refresh=1 is refused; set BATCHLINE_DRIFT_TOKEN or --token-file "
                "to allow refreshes with the token",
                self.http_host or "every address",
            )
        if s.ready_file:
            write_ready_file(
                s.ready_file,
                {"grpc_port": self.grpc_port, "http_port": self.http_port, "pid": os.getpid()},
            )

    async def stop(self) -> None:
        if self._tick is not None:
            self._tick.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._tick
        if self._grpc is not None:
            await self._grpc.stop(grace=1.0)
        if self._http is not None:
            self._http.close()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._http.wait_closed(), 2.0)
        await self.actions.close()

    async def _ticker(self) -> None:
        period = max(0.05, min(1.0, self.settings.eval_every_s / 4 or 1.0))
        while True:
            await asyncio.sleep(period)
            try:
                self.monitor.tick()
            except Exception:
                log.exception("drift evaluation failed")

    # A minimal HTTP/1.1 GET endpoint on the event loop: Prometheus scrapes and a report page
    # need nothing more, and staying on the loop means no locking around the monitor.
    async def _serve_http(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), _HTTP_TIMEOUT_S)
            lines = head.decode("latin-1").split("\r\n")
            method, target, _ = lines[0].split(" ", 2)
            authorization = None
            for line in lines[1:]:
                name, sep, value = line.partition(":")
                if sep and name.strip().lower() == "authorization":
                    authorization = value.strip()
            peer = writer.get_extra_info("peername")
            status, ctype, body = self._route(method, target, authorization, str(peer or ""))
            extra = (
                'WWW-Authenticate: Bearer realm="batchline-drift"\r\n'
                if status[:3] == "401"
                else ""
            )
            writer.write(
                f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\n{extra}"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
            )
            if method != "HEAD":
                writer.write(body)
            await asyncio.wait_for(writer.drain(), _HTTP_TIMEOUT_S)
        except (TimeoutError, ConnectionError, ValueError, asyncio.IncompleteReadError):
            pass
        except asyncio.LimitOverrunError:
            writer.write(
                b"HTTP/1.1 431 Request Header Fields Too Large\r\nConnection: close\r\n\r\n"
            )
        except Exception:
            log.exception("drift HTTP request failed")
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    def _route(
        self, method: str, target: str, authorization: str | None = None, peer: str = ""
    ) -> tuple[str, str, bytes]:
        if method not in ("GET", "HEAD"):
            return "405 Method Not Allowed", "text/plain", b"GET only\n"
        path, _, query = target.partition("?")
        params = {k: v[-1] for k, v in parse_qs(query).items()}
        model, version = params.get("model", ""), params.get("version", "")
        # The last evaluation unless asked (?refresh=1): a page load must not be a way to make
        # the sidecar evaluate every window on demand.
        refresh = params.get("refresh", "0") not in ("0", "false")
        if refresh and path in ("/report.json", "/report", "/"):
            # Evaluating now changes state (alerts may fire, alert_command may run).
            if self.guard.enabled and not self.guard.allows(authorization):
                self.guard.refuse(f"HTTP {path}?refresh", peer)
                return (
                    "401 Unauthorized",
                    "text/plain",
                    b"refresh needs the header Authorization: Bearer <token> ([drift] token); "
                    b"without ?refresh=1 the page shows the last evaluation\n",
                )
            if not self.guard.enabled and not is_loopback(self.http_host):
                return (
                    "403 Forbidden",
                    "text/plain",
                    b"refresh is refused: no drift token is set and HTTP listens beyond loopback "
                    b"(set BATCHLINE_DRIFT_TOKEN or --token-file); without ?refresh=1 the page "
                    b"shows the last evaluation\n",
                )
        if path == "/metrics":
            return "200 OK", CONTENT_TYPE_LATEST, generate_latest(self.registry)
        if path == "/report.json":
            report = self.monitor.report(model, version, refresh=refresh)
            body = json.dumps(report_to_dict(report), indent=1).encode()
            return "200 OK", "application/json", body
        if path in ("/report", "/"):
            report = self.monitor.report(model, version, refresh=refresh)
            return "200 OK", "text/html; charset=utf-8", render_html(report).encode()
        if path == "/healthz":
            return "200 OK", "text/plain", b"ok\n"
        return "404 Not Found", "text/plain", b"not found: try /metrics, /report, /report.json\n"


def _no_profiles(model: str, version: str) -> ReferenceProfile | None:
    return None


async def run_sidecar(settings: DriftSettings) -> None:
    """Serve until SIGTERM or SIGINT, then stop (exit status 0)."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    sidecar = Sidecar(settings)
    try:
        await sidecar.start()
    except BaseException:
        # A port in use, say: release what did start (the gRPC server) before the error
        # reaches the CLI, so the user sees its one line and no teardown traceback.
        await sidecar.stop()
        raise
    await stop.wait()
    log.info("signal received: stopping the drift sidecar")
    await sidecar.stop()


# -- command line ----------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m server.drift.sidecar [flags]`: the sidecar without a config file."""
    from server.observability.logging import configure

    parser = argparse.ArgumentParser(prog="batchline drift", description=__doc__.split("\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        settings = settings_from_args(args, env=os.environ)
    except ConfigError as exc:
        print(f"batchline drift: {exc}", file=sys.stderr)
        return 2
    configure(settings.log_level)
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        asyncio.run(run_sidecar(settings))
    else:
        uvloop.run(run_sidecar(settings))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
