"""The server streams its predictions to a real drift sidecar: primary, canary and shadow."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest

from registry_client.demo import load_reference
from server._proto import inference_pb2 as pb
from server._proto import inference_pb2_grpc as pb_grpc
from tests.support.apps import AppFactory
from tests.support.polling import eventually
from tests.support.processes import Sidecar, spawn_sidecar
from tests.support.requests import infer_request


def _windows(sidecar: Sidecar) -> dict[tuple[str, str, str], dict[str, object]]:
    return {
        (w["model"], w["version"], w["role"]): w  # type: ignore[index]
        for w in sidecar.report()["windows"]  # type: ignore[attr-defined]
    }


async def test_served_predictions_reach_the_sidecar_with_their_route_role(
    start_app: AppFactory,
    demo_registry: Path,
    tmp_path: Path,
) -> None:
    sidecar = spawn_sidecar(demo_registry, tmp_path)
    try:
        await _serve_and_check(start_app, demo_registry, tmp_path, sidecar)
    finally:
        sidecar.kill()


async def _serve_and_check(
    start_app: AppFactory, demo_registry: Path, tmp_path: Path, sidecar: Sidecar
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
            request = infer_request(X[start : start + 3], "churn", id=f"r{start}")
            await stub.ModelInfer(request, timeout=10)
    assert app.drift is not None
    drift = app.drift

    async def counted() -> bool:
        windows = await asyncio.to_thread(_windows, sidecar)
        primary = windows.get(("churn", "1", "primary"), {})
        shadow = windows.get(("churn", "2", "shadow"), {})
        return primary.get("rows_total") == 300 and shadow.get("rows_total") == 300

    await eventually(
        counted,
        timeout=20,
        what="300 rows in the primary and the shadow windows",
        every=0.05,
        detail=lambda: (_windows(sidecar).keys(), drift.counters()),
    )
    counters = app.drift.counters()
    assert counters["dropped_full"] == 0
    assert counters["sent"] == 200


async def test_tagged_load_stays_out_of_drift_and_shadow_statistics(
    start_app: AppFactory,
    demo_registry: Path,
    tmp_path: Path,
) -> None:
    """`traffic: loadtest` and `drift: false` requests are answered like any other, and neither
    reach the drift sidecar nor leave shadow pairs; a drift parameter of the wrong type is
    INVALID_ARGUMENT naming it."""
    sidecar = spawn_sidecar(demo_registry, tmp_path)
    try:
        config = tmp_path / "batchline.toml"
        config.write_text(f'[drift]\nenabled = true\ntarget = "{sidecar.address}"\n')
        app = await start_app(
            models=("churn@production",),
            config=str(config),
            shadows=("2",),
            shadow_max_loop_busy=1.5,
        )
        X, _ = load_reference(demo_registry, "churn", "1")

        def request(i: int, tag: str = "", drift: object = None) -> pb.ModelInferRequest:
            r = infer_request(X[3 * i : 3 * i + 3], "churn", id=f"r{i}")
            if tag:
                r.parameters["traffic"].string_param = tag
            if isinstance(drift, bool):
                r.parameters["drift"].bool_param = drift
            elif isinstance(drift, str):
                r.parameters["drift"].string_param = drift
            elif isinstance(drift, int):
                r.parameters["drift"].int64_param = drift
            return r

        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            sent = [request(i, tag="loadtest") for i in range(0, 30)]
            sent += [request(i, drift=False) for i in range(30, 45)]
            sent += [request(i, drift="false") for i in range(45, 50)]
            live = [request(i) for i in range(50, 60)]
            live += [request(i, tag="live", drift=True) for i in range(60, 70)]
            for r in sent + live:
                reply = await stub.ModelInfer(r, timeout=10)
                assert reply.model_version == "1"
            with pytest.raises(grpc.aio.AioRpcError) as bad:
                await stub.ModelInfer(request(70, drift=1), timeout=10)
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "parameters.drift" in (bad.value.details() or "")
        mirror = app.models.mirror("churn")
        assert mirror is not None
        await mirror.join()
        assert {p.request_id for p in app.pair_log.pairs()} == {f"r{i}" for i in range(50, 70)}
        assert app.drift is not None
        drift = app.drift

        def rows() -> list[object]:
            windows = _windows(sidecar)
            return [windows.get(k, {}).get("rows_total") for k in
                    (("churn", "1", "primary"), ("churn", "2", "shadow"))]  # fmt: skip

        async def counted() -> bool:  # 20 live requests of 3 rows, as primary and as shadow
            return await asyncio.to_thread(rows) == [60, 60]

        await eventually(
            counted,
            timeout=20,
            what="60 rows in the primary and the shadow windows",
            every=0.05,
            detail=lambda: (rows(), drift.counters()),
        )
        assert app.drift.counters()["sent"] == 40
    finally:
        sidecar.kill()
