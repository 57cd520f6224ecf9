"""Drift statistics against hand computations and scipy; profiles; the monitor's windows,
label joins and alert gate on a fake clock (no network)."""

from __future__ import annotations

import json
import math
import socket
import time
from pathlib import Path
from statistics import NormalDist

import numpy as np
import pytest
from scipy import stats as scipy_stats
from scipy.spatial import distance

from server._proto import drift_pb2 as pb
from server.clock import FakeClock
from server.drift import AlertRule, DriftSettings
from server.drift.alerts import Alert, AlertActions
from server.drift.monitor import DriftMonitor
from server.drift.producer import DriftProducer, to_record
from server.drift.profile import (
    ReferenceProfile,
    bin_counts,
    build_histogram,
    build_profile,
    quantile_edges,
)
from server.drift.service import TokenGuard
from server.drift.stats import (
    EPSILON,
    AlertGate,
    js_distance,
    ks_test,
    missing_rate,
    out_of_range_rate,
    psi,
    psi_level,
    roc_auc,
)
from server.drift.windows import RowWindow
from server.errors import ConfigError


def hand_psi(expected: list[float], actual: list[float], eps: float = 1e-4) -> float:
    """The textbook formula in plain Python, floors included."""
    total = 0.0
    for e, a in zip(expected, actual, strict=True):
        e, a = max(e, eps), max(a, eps)
        total += (a - e) * math.log(a / e)
    return total


# -- PSI -----------------------------------------------------------------------------------


def test_psi_of_identical_histograms_is_zero() -> None:
    assert psi([0.1] * 10, [0.1] * 10) == 0.0


def test_psi_of_a_known_shift_matches_the_hand_computation() -> None:
    expected, actual = [0.25, 0.25, 0.25, 0.25], [0.10, 0.20, 0.30, 0.40]
    # (-.15)ln(.4) + (-.05)ln(.8) + (.05)ln(1.2) + (.15)ln(1.6)
    assert psi(expected, actual) == pytest.approx(hand_psi(expected, actual), abs=1e-12)
    assert psi(expected, actual) == pytest.approx(0.228217, abs=1e-6)


def test_psi_normalises_counts() -> None:
    assert psi([25, 25, 25, 25], [10, 20, 30, 40]) == pytest.approx(
        psi([0.25] * 4, [0.1, 0.2, 0.3, 0.4])
    )


def test_psi_floors_an_empty_bin_at_epsilon_instead_of_going_infinite() -> None:
    assert EPSILON == 1e-4
    value = psi([0.5, 0.5], [1.0, 0.0])
    assert math.isfinite(value)
    assert value == pytest.approx(
        0.5 * math.log(2) + (1e-4 - 0.5) * math.log(1e-4 / 0.5), rel=1e-12
    )


def test_psi_of_an_empty_histogram_is_nan() -> None:
    assert math.isnan(psi([0.5, 0.5], [0, 0]))


def test_psi_levels_follow_the_rule_of_thumb() -> None:
    assert [psi_level(v) for v in (0.0, 0.0999, 0.10, 0.25, 0.2501, math.nan)] == [
        "stable",
        "stable",
        "investigate",
        "investigate",
        "act",
        "empty",
    ]


# -- JS, KS, rates, AUC --------------------------------------------------------------------


def test_js_distance_of_identical_histograms_is_zero() -> None:
    assert js_distance([0.2, 0.3, 0.5], [0.2, 0.3, 0.5]) == pytest.approx(0.0, abs=1e-12)


def test_js_distance_of_disjoint_histograms_is_one() -> None:
    assert js_distance([0.5, 0.5, 0.0, 0.0], [0.0, 0.0, 0.3, 0.7]) == pytest.approx(1.0)


def test_js_distance_matches_scipy_base_2() -> None:
    p, q = [0.1, 0.2, 0.3, 0.4], [0.4, 0.3, 0.2, 0.1]
    assert js_distance(p, q) == pytest.approx(float(distance.jensenshannon(p, q, base=2)))


def test_ks_statistic_matches_hand_computation_and_scipy() -> None:
    x, y = [1.0, 2.0, 3.0, 4.0, 5.0], [3.0, 4.0, 5.0, 6.0, 7.0, 8.0]
    statistic, pvalue = ks_test(x, y)
    # Empirical CDFs differ most at 5: F_x = 5/5, F_y = 3/6.
    assert statistic == pytest.approx(0.5)
    reference = scipy_stats.ks_2samp(x, y)
    assert (statistic, pvalue) == pytest.approx((reference.statistic, reference.pvalue))


@pytest.mark.parametrize(
    ("n", "m", "shift"),
    [
        (30, 40, 0.5),
        (320, 320, 0.15),
        (500, 2000, 0.1),
        (2000, 2000, 0.08),
        (2000, 5000, 0.05),
        (2000, 12000, 0.04),  # past scipy's exact limit: its asymptotic p-value
    ],
)
def test_ks_pvalue_is_within_one_percent_of_scipy_at_every_sample_size(
    n: int, m: int, shift: float
) -> None:
    rng = np.random.default_rng(n + m)
    x, y = rng.normal(size=n), rng.normal(shift, 1.0, size=m)
    statistic, pvalue = ks_test(x, y)
    reference = scipy_stats.ks_2samp(x, y)
    assert reference.pvalue > 1e-3, "a p-value worth comparing"
    assert statistic == pytest.approx(reference.statistic, abs=1e-12)
    assert pvalue == pytest.approx(reference.pvalue, rel=0.01)


def test_ks_ignores_missing_values() -> None:
    assert ks_test([1.0, 2.0, math.nan], [1.0, 2.0]) == pytest.approx((0.0, 1.0))


def test_missing_and_out_of_range_rates() -> None:
    values = [math.nan, -5.0, 0.0, 0.5, 1.0, 7.0, math.inf, 0.2]
    assert missing_rate(values) == pytest.approx(2 / 8)
    # Of the 6 finite values, -5 and 7 are outside [0, 1].
    assert out_of_range_rate(values, 0.0, 1.0) == pytest.approx(2 / 6)


def test_out_of_range_rate_against_an_all_missing_reference_is_undefined() -> None:
    reference = np.array([math.nan, math.nan])
    low, high = float(np.min(reference)), float(np.max(reference))
    assert math.isnan(out_of_range_rate([0.1, 0.2], low, high))


def test_roc_auc_matches_a_hand_count_of_ordered_pairs() -> None:
    # Positives 0.35, 0.8 vs negatives 0.1, 0.4: 3 of 4 pairs ordered right.
    assert roc_auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)
    assert math.isnan(roc_auc([1, 1], [0.2, 0.3]))


@pytest.mark.parametrize(
    "encoding",
    [(0, 1), (-1, 1), (False, True), (0.0, 1.0), (1, 2)],
    ids=["0/1", "-1/1", "bool", "float", "1/2"],
)
def test_roc_auc_equals_sklearn_for_every_binary_label_encoding(
    encoding: tuple[object, object],
) -> None:
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(7)
    hit = rng.random(400) < 0.3
    scores = np.round(rng.random(400) + 0.3 * hit, 2)  # rounded: ties included
    labels = np.where(hit, encoding[1], encoding[0])
    assert roc_auc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


def test_roc_auc_is_undefined_for_more_than_two_classes_or_none() -> None:
    assert math.isnan(roc_auc([0, 1, 2], [0.1, 0.5, 0.9]))
    assert math.isnan(roc_auc([], []))


# -- profiles ------------------------------------------------------------------------------


def test_bins_are_deduplicated_quantiles_with_open_outer_bins() -> None:
    binary = [0.0] * 70 + [1.0] * 30
    assert quantile_edges(binary).tolist() == [0.0, 1.0]
    # Right-closed: 0 and 1 sit in their own bins; values beyond the reference range still land.
    assert bin_counts([-3.0, 0.0, 0.0, 1.0, 2.0, math.nan], [0.0, 1.0]).tolist() == [3, 1, 1]


def test_reference_shares_are_deciles() -> None:
    hist = build_histogram("x", np.arange(1000, dtype=float))
    assert hist.edges.size == 9
    assert hist.shares.tolist() == pytest.approx([0.1] * 10)
    assert (hist.min, hist.max) == (0.0, 999.0)


def test_reference_sample_is_bounded() -> None:
    hist = build_histogram("x", np.arange(10_000, dtype=float), sample_rows=2000)
    assert hist.sample.size == 2000
    assert hist.count == 10_000


def test_profile_round_trips_through_json() -> None:
    rng = np.random.default_rng(3)
    X = rng.normal(size=(3000, 4)).astype(np.float32)
    X[::50, 2] = np.nan
    profile = build_profile(X, rng.uniform(size=500), feature_names=("a", "b", "c", "d"))
    back = ReferenceProfile.from_json(profile.to_json())
    assert back.feature_names == ("a", "b", "c", "d")
    assert back.rows == 3000
    assert back.features[2].missing_rate == pytest.approx(60 / 3000)
    for ours, theirs in zip(
        (*profile.features, profile.score), (*back.features, back.score), strict=True
    ):
        assert theirs.edges.tolist() == ours.edges.tolist()
        assert theirs.shares.tolist() == ours.shares.tolist()
        assert (theirs.min, theirs.max, theirs.mean, theirs.std) == (
            ours.min,
            ours.max,
            ours.mean,
            ours.std,
        )
        np.testing.assert_allclose(theirs.sample, ours.sample, rtol=1e-6)
    assert json.loads(profile.to_json())["schema"] == 1


def test_profile_rejects_edges_and_shares_that_disagree() -> None:
    data = json.loads(build_profile(np.zeros((10, 1)) + np.arange(10)[:, None], [0.5]).to_json())
    data["features"][0]["shares"] = [1.0]
    with pytest.raises(ValueError, match="shares"):
        ReferenceProfile.from_dict(data)


# -- alert gate and settings ---------------------------------------------------------------


def test_alert_gate_fires_once_per_crossing_and_respects_the_cooldown() -> None:
    gate = AlertGate(cooldown_s=60.0)
    assert gate.update("k", True, 0.0) is True
    assert gate.update("k", True, 1.0) is False  # still breached: no repeat
    assert gate.update("k", False, 2.0) is False
    assert gate.update("k", True, 3.0) is False  # re-crossed inside the cool-down
    assert gate.is_active("k")
    assert gate.update("k", False, 61.0) is False
    assert gate.update("k", True, 62.0) is True  # cool-down over
    assert gate.update("k", False, 200.0) is False
    assert gate.known() == []  # forgotten once inactive and cooled down


def test_alert_rules_parse_and_breach() -> None:
    rule = AlertRule.parse("feature_psi > 0.25")
    assert (rule.metric, rule.op, rule.threshold) == ("feature_psi", ">", 0.25)
    assert rule.breached(0.26)
    assert not rule.breached(0.25)
    assert not rule.breached(math.nan)
    assert AlertRule.parse("accuracy<0.7").breached(0.6)
    with pytest.raises(ValueError, match="unknown metric"):
        AlertRule.parse("latency > 1")


def test_settings_errors_name_the_key() -> None:
    with pytest.raises(ConfigError, match=r"drift\.sample_ratio"):
        DriftSettings(sample_ratio=1.5)
    with pytest.raises(ConfigError, match=r"drift\.alerts"):
        DriftSettings(alerts=("psi >> 1",))


def test_producer_record_takes_the_positive_class_column() -> None:
    item = ("m", "1", "canary", "r1", "e1", np.ones((2, 3)), np.array([[0.9, 0.1], [0.2, 0.8]]))
    record = to_record((*item, np.array([0, 1]), 0.002, 123))
    assert (record.rows, record.n_features, record.role) == (2, 3, pb.ROLE_CANARY)
    assert list(record.scores) == pytest.approx([0.1, 0.8])
    assert list(record.labels) == [0, 1]


# -- the monitor ---------------------------------------------------------------------------


def normal_quantiles(n: int, shift: float = 0.0) -> list[float]:
    """n evenly spaced quantiles of N(shift, 1): a noise-free 'sample'."""
    dist = NormalDist()
    return [dist.inv_cdf((i + 0.5) / n) + shift for i in range(n)]


def batch_of(
    columns: list[list[float]], scores: list[float], request_id: str
) -> pb.PredictionBatch:
    rows = len(scores)
    features = [columns[j][i] for i in range(rows) for j in range(len(columns))]
    record = pb.PredictionRecord(
        model="churn",
        version="1",
        role=pb.ROLE_PRIMARY,
        request_id=request_id,
        rows=rows,
        n_features=len(columns),
        features=features,
        scores=scores,
        labels=[1] * rows,
    )
    return pb.PredictionBatch(records=[record])


def monitor_for(
    profile: ReferenceProfile, clock: FakeClock, alerts: list[Alert], **overrides: object
) -> DriftMonitor:
    settings = DriftSettings(
        window_rows=5000,
        window_s=0.0,
        min_rows=100,
        eval_every_records=0,
        alerts=("feature_psi > 0.10", "feature_psi > 0.25"),
        alert_cooldown_s=600.0,
        **overrides,  # type: ignore[arg-type]
    )
    return DriftMonitor(
        settings, lambda m, v: profile, clock=clock, on_alert=alerts.append, wall=lambda: 0.0
    )


def test_simulated_mean_shift_crosses_010_then_025_at_the_expected_steps_and_alerts_once() -> None:
    """f0's mean moves by 0.1 sigma a step; f1 stays put."""
    reference = normal_quantiles(2000)
    profile = build_profile(np.column_stack([reference, reference]), np.linspace(0, 1, 2000))
    # Expected PSI per step, independently: true N(0,1) deciles, shares of N(shift, 1).
    dist = NormalDist()
    edges = [dist.inv_cdf(k / 10) for k in range(1, 10)]

    def expected_psi(shift: float) -> float:
        cdf = [0.0, *(dist.cdf(e - shift) for e in edges), 1.0]
        actual = [cdf[i + 1] - cdf[i] for i in range(10)]
        return hand_psi([0.1] * 10, actual)

    steps = [k / 10 for k in range(11)]
    expected = [expected_psi(s) for s in steps]
    first_investigate = next(i for i, v in enumerate(expected) if v >= 0.10)
    first_act = next(i for i, v in enumerate(expected) if v > 0.25)
    assert (first_investigate, first_act) == (4, 6)  # 0.4 sigma and 0.6 sigma

    clock = FakeClock()
    alerts: list[Alert] = []
    monitor = monitor_for(profile, clock, alerts)
    measured = []
    for k, shift in enumerate(steps):
        monitor.ingest(
            batch_of(
                [normal_quantiles(5000, shift), normal_quantiles(5000)],
                [0.5] * 5000,
                f"step-{k}",
            )
        )
        monitor.evaluate_all()
        window = monitor.report().windows[0]
        f0, f1 = window.features[0], window.features[1]
        assert f1.psi < 0.01
        measured.append(f0.psi)
        fired = [(a.threshold, a.feature) for a in alerts]
        assert fired.count((0.10, "f0")) == (1 if k >= first_investigate else 0)
        assert fired.count((0.25, "f0")) == (1 if k >= first_act else 0)
        clock.advance(1.0)
    assert measured == pytest.approx(expected, abs=0.005)
    assert next(i for i, v in enumerate(measured) if v >= 0.10) == first_investigate
    assert next(i for i, v in enumerate(measured) if v > 0.25) == first_act
    assert len(alerts) == 2
    assert monitor.report().windows[0].active_alerts == [
        "feature_psi > 0.1[f0]",
        "feature_psi > 0.25[f0]",
    ]

    # Back to normal and drifted again within the cool-down: no new alert.
    def step(shift: float) -> None:
        columns = [normal_quantiles(5000, shift), normal_quantiles(5000)]
        monitor.ingest(batch_of(columns, [0.5] * 5000, "again"))
        monitor.evaluate_all()

    step(0.0)
    step(0.8)
    assert len(alerts) == 2
    # After the cool-down a new crossing fires again (once per rule).
    clock.advance(600.0)
    step(0.0)
    step(0.8)
    assert len(alerts) == 4


def test_accuracy_and_auc_come_from_posted_labels() -> None:
    profile = build_profile(np.arange(200, dtype=float)[:, None], np.linspace(0, 1, 200))
    alerts: list[Alert] = []
    settings = DriftSettings(min_rows=1, eval_every_records=0, alerts=("accuracy < 0.9",))
    monitor = DriftMonitor(settings, lambda m, v: profile, on_alert=alerts.append)
    batch = pb.PredictionBatch()
    for i, (score, predicted) in enumerate([(0.9, 1), (0.8, 1), (0.3, 0), (0.6, 1)]):
        batch.records.add(
            model="churn",
            version="1",
            role=pb.ROLE_PRIMARY,
            request_id=f"r{i}",
            rows=1,
            n_features=1,
            features=[float(i)],
            scores=[score],
            labels=[predicted],
        )
    monitor.ingest(batch)
    ack = monitor.post_labels(
        pb.LabelBatch(
            labels=[
                pb.Label(request_id="r0", labels=[1]),
                pb.Label(request_id="r1", labels=[0]),
                pb.Label(request_id="r2", labels=[0]),
                pb.Label(request_id="r3", labels=[1]),
                pb.Label(request_id="nope", labels=[1]),
                pb.Label(request_id="r0", labels=[1]),  # already joined
            ]
        )
    )
    assert (ack.matched, ack.unknown, ack.mismatched) == (4, 2, 0)
    monitor.evaluate_all()
    window = monitor.report().windows[0]
    assert window.labelled_rows == 4
    assert window.accuracy == pytest.approx(3 / 4)
    # Positives 0.9, 0.6 vs negatives 0.8, 0.3: 3 of 4 pairs ordered right.
    assert window.auc == pytest.approx(0.75)
    assert [a.metric for a in alerts] == ["accuracy"]


def test_label_memory_is_bounded_in_rows() -> None:
    profile = build_profile(np.arange(10, dtype=float)[:, None], [0.5])
    settings = DriftSettings(label_memory_rows=50, eval_every_records=0)
    monitor = DriftMonitor(settings, lambda m, v: profile)
    for i in range(100):
        monitor.ingest(batch_of([[1.0, 2.0, 3.0]], [0.5, 0.5, 0.5], f"r{i}"))
    assert 47 <= monitor.pending_label_rows <= 50
    ack = monitor.post_labels(pb.LabelBatch(labels=[pb.Label(request_id="r0", labels=[1, 1, 1])]))
    assert ack.unknown == 1  # the oldest went first


def test_records_of_zero_rows_are_rejected_and_take_no_label_memory() -> None:
    profile = build_profile(np.arange(10, dtype=float)[:, None], [0.5])
    monitor = DriftMonitor(DriftSettings(eval_every_records=0), lambda m, v: profile)
    for i in range(1000):
        record = pb.PredictionRecord(
            model="churn", version="1", role=pb.ROLE_PRIMARY, request_id=f"z{i}", rows=0
        )
        monitor.ingest(pb.PredictionBatch(records=[record]))
    assert monitor.rejected == {"rows": 1000}
    assert monitor.pending_label_rows == 0
    assert monitor.window_states() == []


def test_oversized_request_ids_are_not_kept_for_labels() -> None:
    profile = build_profile(np.arange(10, dtype=float)[:, None], [0.5])
    monitor = DriftMonitor(DriftSettings(eval_every_records=0), lambda m, v: profile)
    monitor.ingest(batch_of([[1.0]], [0.5], "x" * (2 * 1024 * 1024)))  # a 2 MiB id
    monitor.ingest(batch_of([[1.0]], [0.5], "ok"))
    assert monitor.rejected == {"request_id": 1}
    assert monitor.pending_label_rows == 1  # only "ok"'s row waits for a label


def test_windows_are_bounded_and_unknown_models_never_evict_monitored_ones() -> None:
    profile = build_profile(np.arange(10, dtype=float)[:, None], [0.5])
    settings = DriftSettings(max_windows=2, eval_every_records=0)
    monitor = DriftMonitor(settings, lambda m, v: profile if m == "churn" else None)
    monitor.ingest(batch_of([[1.0]], [0.5], "a"))
    for name in ("x", "y", "z"):
        monitor.ingest(
            pb.PredictionBatch(records=[pb.PredictionRecord(model=name, version="1", rows=1)])
        )
    keys = [key for key, *_ in monitor.window_states()]
    assert len(keys) == 2
    assert ("churn", "1", "primary") in keys
    assert monitor.rejected == {"no_profile": 1, "no_window": 2}


def test_row_window_keeps_the_last_rows_and_their_times() -> None:
    window = RowWindow(capacity=4, n_features=1)
    for t in range(6):
        window.append(np.array([[float(t)]], np.float32), np.array([t], np.float32), float(t))
    features, _ = window.view(since=-math.inf)
    assert sorted(features[:, 0].tolist()) == [2.0, 3.0, 4.0, 5.0]
    features, _ = window.view(since=4.0)
    assert sorted(features[:, 0].tolist()) == [4.0, 5.0]
    window.append(np.zeros((10, 1), np.float32), np.zeros(10, np.float32), 9.0)
    assert window.size == 4
    assert window.view(since=9.0)[0].shape == (4, 1)


def test_mismatched_shapes_are_rejected_not_windowed() -> None:
    profile = build_profile(np.zeros((10, 2)) + np.arange(10)[:, None], [0.5])
    monitor = DriftMonitor(DriftSettings(eval_every_records=0), lambda m, v: profile)
    monitor.ingest(batch_of([[1.0]], [0.5], "one-feature"))  # the profile has two
    assert monitor.rejected == {"shape": 1}


# -- producer and alert actions without a sidecar ------------------------------------------


async def test_producer_with_no_sidecar_queues_then_drops_and_counts_without_blocking() -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    producer = DriftProducer(
        f"127.0.0.1:{port}", queue_size=10, backoff_initial_s=0.01, connect_timeout_s=0.05
    )
    await producer.start()
    started = time.perf_counter()
    for i in range(25):
        producer.record("m", "1", "primary", f"r{i}", "", np.ones(3), np.array([0.5]))
    producer.record("m", "1", "primary", "bad", "", object(), None)  # garbage: still no raise
    assert time.perf_counter() - started < 0.01
    assert (producer.pending, producer.dropped_disconnected) == (10, 16)
    await producer.stop(flush_timeout_s=0.2)
    assert producer.sent == 0
    assert producer.dropped_disconnected == 26  # what was still queued counts too
    assert producer.pending == 0


async def test_alert_command_gets_the_alert_as_json(tmp_path: Path) -> None:
    out = tmp_path / "alert.json"
    actions = AlertActions(
        command=f"sh -c 'printf %s \"$BATCHLINE_ALERT\" > {out}.tmp && mv {out}.tmp {out}'"
    )
    actions(
        Alert("feature_psi > 0.25", "feature_psi", 0.3, 0.25, "churn", "1", "primary", "f3", 0.0)
    )
    await actions.close(grace_s=10.0)
    assert json.loads(out.read_text())["feature"] == "f3"
    assert actions.failures == 0


# -- bounds in bytes and the token guard ------------------------------------------------------


async def test_producer_queue_is_bounded_in_bytes_as_well_as_in_records() -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cap = 64 * 1024
    producer = DriftProducer(
        f"127.0.0.1:{port}", queue_size=10_000, max_queue_bytes=cap, connect_timeout_s=0.05
    )
    await producer.start()
    features = np.ones((64, 15), np.float32)  # 3,840 bytes a record, plus a 10 KB id
    for i in range(100):
        producer.record("m", "1", "primary", f"{i}-" + "x" * 10_000, "", features, None)
    assert 0 < producer.pending_bytes <= cap
    assert producer.pending <= cap // (10_000 + features.nbytes)
    assert producer.dropped_disconnected == 100 - producer.pending
    await producer.stop(flush_timeout_s=0.1)
    assert (producer.pending, producer.pending_bytes, producer.dropped_disconnected) == (0, 0, 100)


def test_monitor_label_memory_is_bounded_in_bytes_and_long_names_are_rejected() -> None:
    profile = build_profile(np.arange(200, dtype=float)[:, None], np.linspace(0, 1, 200))
    cap = 8 * 1024
    monitor = DriftMonitor(
        DriftSettings(eval_every_records=0, label_memory_bytes=cap), lambda m, v: profile
    )
    for i in range(50):
        monitor.ingest(batch_of([[float(i)]], [0.5], f"{i:03d}-" + "y" * 900))
    assert 0 < monitor.pending_label_bytes <= cap
    assert monitor.pending_label_rows * 900 <= cap
    assert monitor.label_memory_evicted["bytes"] == 50 - monitor.pending_label_rows
    long_name = batch_of([[1.0]], [0.5], "r")
    long_name.records[0].model = "m" * 300
    monitor.ingest(long_name)
    assert monitor.rejected.get("name") == 1
    assert len(monitor.window_states()) == 1  # no window for the long name


def test_token_guard_compares_bearer_tokens_and_counts_refusals() -> None:
    guard = TokenGuard("t0ken", FakeClock())
    assert guard.allows("Bearer t0ken")
    assert guard.allows("bearer  t0ken ")
    for bad in (None, "", "t0ken", "Basic t0ken", "Bearer t0ke", "Bearer t0ken2"):
        assert not guard.allows(bad), bad
    guard.refuse("Record", "ipv4:127.0.0.1:1")
    guard.refuse("Record", "ipv4:127.0.0.1:2")
    assert guard.refused == {"Record": 2}
    open_guard = TokenGuard("")
    assert not open_guard.enabled
    assert open_guard.allows(None)
