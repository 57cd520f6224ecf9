"""Drift records lost by a real `batchline serve` process are said, not only counted: a sidecar
away for longer than drift.warn_after_s is logged with the records dropped (and its return), the
queue holds no more bytes than drift.max_queue_bytes, and SIGTERM logs what never arrived."""

from __future__ import annotations

import asyncio
import itertools
import json
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from server._proto import inference_pb2 as pb
from tests.fault.conftest import Servers, channel
from tests.support.metrics import metric, scrape_async
from tests.support.polling import eventually
from tests.support.processes import ServerProcess, Sidecar, free_port, spawn_sidecar
from tests.support.requests import infer_request

PRODUCER = "server.drift.producer"


def log_lines(server: ServerProcess, logger: str = PRODUCER) -> list[dict[str, Any]]:
    lines = []
    for line in server.log.read_text().splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and entry.get("logger") == logger:
            lines.append(entry)
    return lines


def warnings_with(server: ServerProcess, text: str) -> list[dict[str, Any]]:
    return [e for e in log_lines(server) if e["level"] == "warning" and text in e["message"]]


def request(i: int, rows: int = 1, id_chars: int = 0) -> pb.ModelInferRequest:
    x = np.full((rows, 15), 0.1 * (i % 7), np.float32)
    return infer_request(x, "churn", id=f"r{i}-" + "x" * id_chars)


async def serve(server: ServerProcess, n: int, **kwargs: int) -> None:
    async with channel(server) as stub:
        for i in range(n):  # one at a time: each answered request is one drift record
            await stub.ModelInfer(request(i, **kwargs), timeout=10)


def drift_config(port: int, **keys: object) -> str:
    lines = ["[drift]", "enabled = true", f'target = "127.0.0.1:{port}"']
    lines += [f"{key} = {value}" for key, value in keys.items()]
    return "\n".join(lines) + "\n"


async def test_a_sidecar_away_longer_than_warn_after_s_is_warned_about_then_its_return_said(
    servers: Servers, demo_registry: Path, tmp_path: Path
) -> None:
    port = free_port()  # nobody listens here yet
    warn_after_s = 0.5
    config = drift_config(
        port, queue_size=5, warn_after_s=warn_after_s, backoff_max_s=0.2, flush_timeout_s=2.0
    )
    server = servers.start(demo_registry, config, "churn@production")
    await serve(server, 20)  # 5 fit the queue, 15 are dropped while the sidecar is away
    samples = await scrape_async(server.metrics_port)
    assert (
        metric(samples, "batchline_drift_producer_records_total", outcome="dropped_disconnected")
        == 15
    )
    assert metric(samples, "batchline_drift_producer_queue") == 5

    await eventually(
        lambda: len(warnings_with(server, "15 prediction records dropped meanwhile")) >= 2,
        timeout=30,
        what="two unreachable warnings with the 15 dropped records",
    )
    warned = warnings_with(server, "unreachable for")
    assert all("never connected" in w["message"] for w in warned)
    assert all(f"127.0.0.1:{port}" in w["message"] for w in warned)
    times = [datetime.fromisoformat(w["time"]) for w in warned]
    # Never more often than warn_after_s (the log's clock has millisecond resolution).
    assert all(
        (b - a).total_seconds() >= warn_after_s - 0.002 for a, b in itertools.pairwise(times)
    ), times

    sidecar: Sidecar = await asyncio.to_thread(spawn_sidecar, demo_registry, tmp_path, port)
    try:
        await eventually(
            lambda: any(
                e["level"] == "info" and "reachable again" in e["message"]
                for e in log_lines(server)
            ),
            timeout=30,
            what="the producer's reconnect line",
        )
        (back,) = [e for e in log_lines(server) if "reachable again" in e["message"]]
        assert "15 prediction records were dropped while it was away" in back["message"]

        async def queued_sent() -> bool:
            window = await asyncio.to_thread(sidecar.window)
            return window["records_total"] == 5

        await eventually(queued_sent, timeout=30, what="the 5 queued records at the sidecar")
        Servers.stop(server)
    finally:
        sidecar.kill()
    (summary,) = warnings_with(server, "drift producer stopped")
    assert summary["message"].startswith(
        "drift producer stopped: 15 prediction records never reached the sidecar"
    )
    assert "0 dropped with the queue full, 15 while it was unreachable" in summary["message"]
    assert "of which 0 were still queued" in summary["message"]
    assert summary["message"].endswith("; 5 sent")


async def test_the_queue_holds_no_more_than_max_queue_bytes_and_sigterm_says_what_was_lost(
    servers: Servers, demo_registry: Path
) -> None:
    cap = 64 * 1024
    rows, id_chars = 64, 240
    config = drift_config(free_port(), max_queue_bytes=cap, warn_after_s=600.0, flush_timeout_s=0.5)
    server = servers.start(demo_registry, config, "churn@production")
    await serve(server, 100, rows=rows, id_chars=id_chars)
    samples = await scrape_async(server.metrics_port)
    queued = metric(samples, "batchline_drift_producer_queue")
    held = metric(samples, "batchline_drift_producer_queue_bytes")
    dropped = metric(
        samples, "batchline_drift_producer_records_total", outcome="dropped_disconnected"
    )
    assert 0 < held <= cap
    # Each queued record holds at least its features and id: count alone would have kept 100.
    assert 1 <= queued <= cap // (rows * 15 * 4 + id_chars)
    assert dropped == 100 - queued
    assert not warnings_with(server, "unreachable")  # warn_after_s is far away

    Servers.stop(server)
    (summary,) = warnings_with(server, "drift producer stopped")
    assert summary["message"].startswith(
        "drift producer stopped: 100 prediction records never reached the sidecar"
    )
    assert (
        f"of which {int(queued)} were still queued at the 0.5s flush deadline"
        in (summary["message"])
    )
    assert summary["message"].endswith("; 0 sent")


async def test_no_loss_no_shutdown_warning(
    servers: Servers, demo_registry: Path, tmp_path: Path
) -> None:
    sidecar = spawn_sidecar(demo_registry, tmp_path)
    try:
        server = servers.start(demo_registry, drift_config(sidecar.grpc_port), "churn@production")
        await serve(server, 10)

        async def arrived() -> bool:
            window = await asyncio.to_thread(sidecar.window)
            return window["records_total"] == 10

        await eventually(arrived, timeout=30, what="the 10 records at the sidecar")
        Servers.stop(server)
    finally:
        sidecar.kill()
    assert not [e for e in log_lines(server) if e["level"] == "warning"]
