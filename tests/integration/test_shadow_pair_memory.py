"""The shadow pair log of a real server holds no more bytes than
server.shadow_log_max_memory_bytes: big pairs push out old ones, and the metric counts them."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import numpy as np

from server._proto import inference_pb2_grpc as pb_grpc
from tests.support.apps import AppFactory
from tests.support.metrics import scrape as _scrape
from tests.support.requests import infer_request


async def test_pairs_in_memory_are_bounded_in_bytes_newest_kept_and_evictions_counted(
    start_app: AppFactory, demo_registry: Path
) -> None:
    cap = 32 * 1024
    rows, n = 64, 20
    app = await start_app(
        models=("churn@production",),
        shadows=("2",),
        shadow_max_loop_busy=1.5,  # count every pair: no shedding on a busy machine
        server={"shadow_log_max_memory_bytes": cap},
    )
    x = np.linspace(0, 1, rows * 15, dtype=np.float32).reshape(rows, 15)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        for i in range(n):
            request = infer_request(x, "churn", id=f"big-{i:02d}")
            await stub.ModelInfer(request, timeout=30)
    mirror = app.models.mirror("churn")
    assert mirror is not None
    await mirror.join()

    pairs = app.pair_log.pairs()
    # Each pair holds at least its 2 x 64 scores as 8-byte floats: a count bound alone would
    # have kept all 20 (shadow_log_max_pairs is 10,000).
    assert 1 <= len(pairs) <= cap // (2 * rows * 8)
    assert len(pairs) < n
    assert [p.request_id for p in pairs] == [f"big-{i:02d}" for i in range(n - len(pairs), n)]
    assert 0 < app.pair_log.memory_bytes <= cap

    metrics = await asyncio.to_thread(_scrape, app.metrics_port)
    assert metrics["batchline_shadow_pairs_evicted_total", (("bound", "bytes"),)] == n - len(pairs)
    assert metrics["batchline_shadow_pairs_evicted_total", (("bound", "pairs"),)] == 0
    assert metrics["batchline_shadow_pairs_memory_bytes", ()] == app.pair_log.memory_bytes
