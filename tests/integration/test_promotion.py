"""The automatic promotion gate, judged on real mirrored pairs."""

from __future__ import annotations

import shutil
from pathlib import Path

import grpc
import pytest

from registry_client import FileRegistry
from registry_client.demo import load_reference
from server._proto import inference_pb2_grpc as pb_grpc
from server.app import App
from server.shadow.promotion import PromotionGate
from tests.support.apps import AppFactory
from tests.support.requests import infer_request


async def _mirrored(
    start_app: AppFactory, demo_registry: Path, tmp_path: Path, body: str
) -> tuple[App, Path]:
    registry = tmp_path / "registry"
    shutil.copytree(demo_registry, registry)
    config = tmp_path / "batchline.toml"
    config.write_text(
        '[models.churn]\nref = "churn@production"\nshadows = ["2"]\nshadow_max_loop_busy = 1.5\n'
        + body
    )
    app = await start_app(models=(), config=str(config), registry=registry)
    X, _ = load_reference(demo_registry, "churn", "1")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        for i in range(120):
            request = infer_request(X[i : i + 1], "churn", id=f"r{i}")
            await stub.ModelInfer(request, timeout=10)
    mirror = app.models.mirror("churn")
    assert mirror is not None
    await mirror.join()
    return app, registry


LOOSE = "[models.churn.gate]\nmin_requests = 100\nmin_agreement = 0.5\nmax_mean_abs_diff = 0.5\nmax_error_rate = 0.05\n"


async def test_a_shadow_that_passes_the_gate_is_promoted_through_the_registry(
    start_app: AppFactory, demo_registry: Path, tmp_path: Path
) -> None:
    app, registry = await _mirrored(
        start_app, demo_registry, tmp_path, 'gate_action = "apply"\n' + LOOSE
    )
    gate = PromotionGate(app.models, app.pair_log, count_from_ns=0)  # the pairs collected so far
    decisions = await gate.check("churn")
    assert decisions["2"].action == "promote"
    assert FileRegistry(registry).aliases("churn")["production"] == "2"
    assert app.models.get("churn").key.version == "2"
    assert app.models.route("churn").shadows == ()  # type: ignore[union-attr]


async def test_a_shadow_that_breaks_a_threshold_is_dropped_from_the_route(
    start_app: AppFactory, demo_registry: Path, tmp_path: Path
) -> None:
    strict = LOOSE.replace("max_mean_abs_diff = 0.5", "max_mean_abs_diff = 0.0")
    app, registry = await _mirrored(
        start_app, demo_registry, tmp_path, 'gate_action = "apply"\n' + strict
    )
    gate = PromotionGate(app.models, app.pair_log, count_from_ns=0)
    decisions = await gate.check("churn")
    assert decisions["2"].action == "rollback"
    assert decisions["2"].numbers["mean_abs_diff"] > 0
    assert app.models.route("churn").shadows == ()  # type: ignore[union-attr]
    assert FileRegistry(registry).aliases("churn")["production"] == "1"
    assert app.models.get("churn").key.version == "1"


async def test_gate_action_log_decides_without_acting(
    start_app: AppFactory, demo_registry: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    app, registry = await _mirrored(
        start_app, demo_registry, tmp_path, 'gate_action = "log"\n' + LOOSE
    )
    gate = PromotionGate(app.models, app.pair_log, count_from_ns=0)
    decisions = await gate.check("churn")
    assert decisions["2"].action == "promote"
    assert FileRegistry(registry).aliases("churn")["production"] == "1"
    assert "not applied" in caplog.text
    assert "label_agreement=" in caplog.text


async def test_the_gate_judges_the_pairs_of_every_worker_together(
    start_app: AppFactory, demo_registry: Path, tmp_path: Path
) -> None:
    """With --workers N the gate runs once, in worker 0, on every worker's pairs: 60 pairs here
    and 60 in another worker's log file pass min_requests = 100; either half alone waits."""
    from server.shadow.log import PairLog
    from server.shadow.promotion import pooled_pairs

    app, registry = await _mirrored(
        start_app, demo_registry, tmp_path, 'gate_action = "apply"\n' + LOOSE
    )
    pairs = app.pair_log.pairs()
    assert len(pairs) == 120
    mine, theirs_path = PairLog(1000), tmp_path / "pairs.jsonl.w1"
    theirs = PairLog(1000, path=theirs_path)
    for pair in pairs[:60]:
        mine.append(pair)
    for pair in pairs[60:]:
        theirs.append(pair)
    theirs.close()

    alone = PromotionGate(app.models, mine, count_from_ns=0)
    assert (await alone.check("churn"))["2"].action == "wait"
    pooled = PromotionGate(
        app.models,
        mine,
        count_from_ns=0,
        contents=pooled_pairs(mine, [theirs_path]),
        control=app.control,
    )
    assert (await pooled.check("churn"))["2"].action == "promote"
    assert FileRegistry(registry).aliases("churn")["production"] == "2"
    assert app.models.get("churn").key.version == "2"
