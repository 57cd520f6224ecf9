"""Shedding at the gRPC layer, on a real server process flooded by a burst of calls.

`max_concurrent_rpcs` caps the calls Python runs at once (grpc.aio refuses the rest with
RESOURCE_EXHAUSTED before our handler); `max_pending_rpcs` caps the calls gRPC's core holds
for Python and refuses beyond it without running any Python (gRPC core answers CANCELLED; the
grpcio transport's alone: the native one has no core queue, every call reaches Python at once).
Either way every call gets an answer, nothing hangs, and the server serves on afterwards.
"""

from __future__ import annotations

import asyncio
import collections
from pathlib import Path

import grpc
import numpy as np

from server._proto import inference_pb2 as pb
from server._proto import inference_pb2_grpc as pb_grpc
from tests.support.processes import spawn_server
from tests.support.requests import infer_request

BURST = 400


def _request() -> pb.ModelInferRequest:
    return infer_request(np.zeros((64, 15), np.float32), "churn_mlp")


async def _burst(address: str) -> tuple[collections.Counter[str], set[str]]:
    statuses: collections.Counter[str] = collections.Counter()
    details: set[str] = set()
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        await stub.ModelInfer(_request(), timeout=30)  # connected and warm
        results = await asyncio.gather(
            *(stub.ModelInfer(_request(), timeout=60) for _ in range(BURST)),
            return_exceptions=True,
        )
        for result in results:
            if isinstance(result, grpc.aio.AioRpcError):
                statuses[result.code().name] += 1
                details.add(f"{result.code().name}: {result.details()}")
            else:
                assert isinstance(result, pb.ModelInferResponse)
                statuses["OK"] += 1
        after = await stub.ModelInfer(_request(), timeout=30)
        assert len(after.outputs) == 2, "the server serves on after the burst"
    return statuses, details


async def _flood(demo_registry: Path, tmp_path: Path, settings: str) -> collections.Counter[str]:
    config = tmp_path / "batchline.toml"
    config.write_text(f"[server]\n{settings}")
    server = spawn_server(
        demo_registry, tmp_path, "--model", "churn_mlp@production", "--config", str(config)
    )
    try:
        statuses, details = await _burst(server.address)
    finally:
        assert server.terminate() == 0
    assert sum(statuses.values()) == BURST, "every call answered"
    assert statuses["OK"] > 0
    assert set(statuses) <= {"OK", "RESOURCE_EXHAUSTED", "CANCELLED"}, details
    return statuses


async def test_concurrent_rpc_cap_refuses_the_burst_with_resource_exhausted(
    demo_registry: Path, tmp_path: Path
) -> None:
    statuses = await _flood(demo_registry, tmp_path, "max_concurrent_rpcs = 2\n")
    assert statuses["RESOURCE_EXHAUSTED"] > 0, statuses
    assert "CANCELLED" not in statuses, statuses


async def test_pending_cap_sheds_in_grpc_core_and_nothing_is_lost(
    demo_registry: Path, tmp_path: Path
) -> None:
    statuses = await _flood(
        demo_registry,
        tmp_path,
        'grpc_transport = "grpcio"\nmax_concurrent_rpcs = 2\nmax_pending_rpcs = 1\n',
    )
    # gRPC core refuses what it cannot hand to Python, before any Python runs: it says CANCELLED.
    assert statuses["CANCELLED"] > 0, statuses
