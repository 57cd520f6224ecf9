"""The server streams its predictions to a real drift sidecar: primary, canary and shadow."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc
import numpy as np

from registry_client.demo import load_reference
from server._proto import inference_pb2 as pb
from server._proto import inference_pb2_grpc as pb_grpc
from server.app import App
from tests.integration.test_drift import Sidecar, spawn_sidecar


def _windows(sidecar: Sidecar) -> dict[tuple[str, str, str], dict[str, object]]:
    return {
        (w["model"], w["version"], w["role"]): w  # type: ignore[index]
        for w in sidecar.report()["windows"]  # type: ignore[attr-defined]
    }


async def test_served_predictions_reach_the_sidecar_with_their_route_role(
    start_app: Callable[..., Awaitable[App]],
    demo_registry: Path,
    tmp_path: Path,
) -> None:
    sidecar = spawn_sidecar(demo_registry, tmp_path)
    try:
        await _serve_and_check(start_app, demo_registry, tmp_path, sidecar)
    finally:
        sidecar.proc.kill()
        sidecar.proc.wait()


async def _serve_and_check(
    start_app: Callable[..., Awaitable[App]], demo_registry: Path, tmp_path: Path, sidecar: Sidecar
) -> None:
    config = tmp_path / "batchline.toml"
    config.write_text(f'[drift]\nenabled = true\ntarget = "{sidecar.address}"\n')
    app = await start_app(
        models=("churn@production",),
        config=str(config),
        shadows=("2",),
        shadow_max_loop_busy=1.5,
    )
    X, _ = load_reference(demo_registry, "churn", "1")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        for start in range(0, 300, 3):
            request = pb.ModelInferRequest(model_name="churn", id=f"r{start}")
            request.inputs.add(name="input", datatype="FP32", shape=[3, 15])
            request.raw_input_contents.append(np.ascontiguousarray(X[start : start + 3]).tobytes())
            await stub.ModelInfer(request, timeout=10)
    assert app.drift is not None
    deadline = asyncio.get_running_loop().time() + 20
    while True:
        windows = await asyncio.to_thread(_windows, sidecar)
        primary = windows.get(("churn", "1", "primary"), {})
        shadow = windows.get(("churn", "2", "shadow"), {})
        if primary.get("rows_total") == 300 and shadow.get("rows_total") == 300:
            break
        assert asyncio.get_running_loop().time() < deadline, (windows.keys(), app.drift.counters())
        await asyncio.sleep(0.05)
    counters = app.drift.counters()
    assert counters["dropped_full"] == 0
    assert counters["sent"] == 200
