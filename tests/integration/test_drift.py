"""The drift sidecar as its own process: a DriftProducer streams to it, the report and metrics
are read over HTTP, and the stream survives the sidecar being killed and restarted."""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from registry_client.demo import load_holdout
from server._proto import drift_pb2 as pb
from server._proto import drift_pb2_grpc as pb_grpc
from server.drift import report as drift_report
from server.drift.producer import DriftProducer
from tests.support.metrics import parse
from tests.support.polling import eventually
from tests.support.processes import Sidecar, free_port, spawn_sidecar

DRIFTED = 3  # the feature the tests shift


async def poll_http(sidecar: Sidecar, condition: object, what: str, limit_s: float = 15.0) -> None:
    """Until `condition(window)` holds for the sidecar's churn v1 window, read over HTTP."""

    async def check() -> bool:
        return bool(condition(await asyncio.to_thread(sidecar.window)))  # type: ignore[operator]

    await eventually(check, timeout=limit_s, what=what, every=0.05, detail=sidecar.window)


def drifted_rows(demo_registry: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The holdout of churn v1 with one feature shifted by two standard deviations."""
    holdout = load_holdout(demo_registry, "churn", "1")
    X = holdout.X.copy()
    X[:, DRIFTED] += 2.0 * X[:, DRIFTED].std()
    return X, holdout.probabilities, holdout.labels, holdout.y


async def test_streamed_predictions_show_up_in_report_and_metrics_with_the_drift_flagged(
    demo_registry: Path, tmp_path: Path, sidecars: list[Sidecar]
) -> None:
    sidecar = spawn_sidecar(demo_registry, tmp_path)
    sidecars.append(sidecar)
    X, proba, predicted, truth = drifted_rows(demo_registry)
    producer = DriftProducer(sidecar.address, chunk=128)
    await producer.start()
    for i in range(len(X)):
        producer.record(
            "churn", "1", "primary", f"req-{i}", f"cust-{i}", X[i], proba[i], predicted[i : i + 1]
        )
    await eventually(lambda: producer.sent == len(X), timeout=15, what="everything sent")
    await poll_http(sidecar, lambda w: w["records_total"] == len(X), "all records counted")

    async with grpc.aio.insecure_channel(sidecar.address) as channel:
        ack = await pb_grpc.DriftServiceStub(channel).PostLabels(
            pb.LabelBatch(
                labels=[
                    pb.Label(request_id=f"req-{i}", labels=[int(truth[i])]) for i in range(len(X))
                ]
            )
        )
    assert (ack.matched, ack.unknown) == (len(X), 0)

    window = sidecar.window()
    assert window["rows_total"] == len(X)
    assert window["window_rows"] == len(X)
    features = {f["name"]: f for f in window["features"]}  # type: ignore[attr-defined]
    assert features[f"f{DRIFTED}"]["level"] == "act"
    assert features[f"f{DRIFTED}"]["psi"] > 0.25
    assert all(f["psi"] < 0.10 for name, f in features.items() if name != f"f{DRIFTED}")
    assert window["score"]["level"] == "stable"  # type: ignore[index]
    assert window["active_alerts"] == [f"feature_psi > 0.25[f{DRIFTED}]"]
    assert window["labelled_rows"] == len(X)
    assert window["accuracy"] == pytest.approx(float(np.mean(predicted == truth)))

    metrics = parse(sidecar.get("/metrics").decode())
    window_labels = (("model", "churn"), ("role", "primary"), ("version", "1"))
    assert metrics["batchline_drift_records_total", window_labels] == len(X)
    drifted = tuple(sorted((*window_labels, ("feature", f"f{DRIFTED}"))))
    assert metrics["batchline_drift_feature_psi", drifted] > 0.25
    active = tuple(sorted((*drifted, ("rule", "feature_psi > 0.25"))))
    assert metrics["batchline_drift_alert_active", active] == 1.0
    assert metrics["batchline_drift_alerts_fired_total", (("metric", "feature_psi"),)] == 1.0
    page = sidecar.get("/report?refresh=1").decode()
    assert page.count("<svg") == 16  # the score and 15 features

    text = await asyncio.to_thread(drift_report.fetch_report, sidecar.address)
    rendered = drift_report.format_text(text)
    assert f"f{DRIFTED}" in rendered
    assert "act" in rendered

    await producer.stop()
    assert producer.dropped_full == producer.dropped_disconnected == 0
    sidecar.proc.send_signal(signal.SIGTERM)
    assert sidecar.proc.wait(timeout=10) == 0, sidecar.log.read_text()


@pytest.fixture
def short_gil_switch_interval() -> Iterator[None]:
    """Other threads here (gRPC's poller, to_thread workers) may keep the GIL for the default
    5 ms switch interval, which would be charged to whatever call the loop thread is in; a short
    interval makes a wall-clock measurement of record() measure record()."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(5e-5)
    yield
    sys.setswitchinterval(before)


@pytest.mark.usefixtures("short_gil_switch_interval")
async def test_stream_resumes_after_the_sidecar_is_killed_and_restarted_on_the_same_port(
    demo_registry: Path, tmp_path: Path, sidecars: list[Sidecar]
) -> None:
    port = free_port()
    first = spawn_sidecar(demo_registry, tmp_path, grpc_port=port)
    sidecars.append(first)
    X, proba, predicted, _ = drifted_rows(demo_registry)
    producer = DriftProducer(
        f"127.0.0.1:{port}", queue_size=200, chunk=50, backoff_initial_s=0.02, backoff_max_s=0.2
    )
    await producer.start()
    costs: list[int] = []
    sequence = 0

    def record_some(n: int) -> None:
        nonlocal sequence
        for _ in range(n):
            i = sequence % len(X)
            started = time.perf_counter_ns()
            producer.record(
                "churn", "1", "primary", f"r{sequence}", "", X[i], proba[i], predicted[i : i + 1]
            )
            costs.append(time.perf_counter_ns() - started)
            sequence += 1

    record_some(150)  # fits the queue even before the stream is up
    await eventually(lambda: producer.sent == 150, timeout=15, what="first records sent")
    await poll_http(first, lambda w: w["records_total"] == 150, "first sidecar counts them")

    first.kill()

    # Serving goes on: keep recording while the producer notices, then past its queue's size.
    def noticed() -> bool:
        if producer.connected:
            record_some(10)
        return not producer.connected

    await eventually(
        noticed, timeout=15, what="the producer noticing", every=0.005, detail=producer.counters
    )
    sent_before_restart = producer.sent
    dropped_before = producer.dropped_disconnected
    record_some(300)
    assert producer.pending == 200  # bounded whatever happens
    assert producer.dropped_disconnected >= dropped_before + 100
    assert producer.sent == sent_before_restart

    # Started off the loop, so the producer keeps retrying meanwhile.
    second = await asyncio.to_thread(spawn_sidecar, demo_registry, tmp_path, port)
    sidecars.append(second)
    assert second.grpc_port == port
    await eventually(lambda: producer.connected, timeout=15, what="reconnected")
    await eventually(lambda: producer.pending == 0, timeout=15, what="the queued records sent")
    record_some(150)
    await eventually(lambda: producer.pending == 0, timeout=15, what="queue drained")
    await poll_http(
        second,
        lambda w: w["records_total"] == producer.sent - sent_before_restart,
        "records arrive at the restarted sidecar",
    )
    assert producer.sent - sent_before_restart == 200 + 150  # the queued, then the new
    assert producer.reconnects == 1
    # record() never waited on the network: a call that did would cost a round trip (or hang,
    # while the sidecar was dead) every time. The median, not the slowest call: one call may
    # be preempted for a scheduler slice on a busy machine, which says nothing about record().
    costs.sort()
    assert costs[len(costs) // 2] < 1_000_000, (
        f"median record() {costs[len(costs) // 2] / 1e3:.0f} us"
    )
    await producer.stop()
