"""The registry vouches for the whole version folder, against real servers: a version whose
external data, feature view or folder is not what was registered is refused at start-up and by
ReloadModel (FAILED_PRECONDITION naming the file) while the old version keeps serving."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import grpc
import numpy as np
import pytest

from registry_client import FileRegistry
from registry_client.demo import load_holdout
from server._proto import admin_pb2 as admin
from server._proto import admin_pb2_grpc as admin_grpc
from server._proto import inference_pb2_grpc as pb_grpc
from server.drift.sidecar import registry_profiles
from server.errors import FailedPrecondition
from tests.support.apps import AppFactory
from tests.support.models import register_with_external_data, tamper_in_place
from tests.support.processes import spawn_server
from tests.support.requests import infer_request, probabilities


@pytest.fixture
def registry(demo_registry: Path, tmp_path: Path) -> Path:
    """A writable copy of the demo registry with churn_mlp version 2: version 1's weights saved
    as ONNX external data (weights.bin) beside its graph."""
    root = tmp_path / "registry"
    shutil.copytree(demo_registry, root)
    mv = register_with_external_data(FileRegistry(root), "churn_mlp", "1", tmp_path)
    assert (mv.version, mv.external_data) == ("2", ("weights.bin",))
    return root


def _rows(registry: Path, n: int = 32) -> np.ndarray:
    return load_holdout(registry, "churn_mlp", "1").X[:n]


async def _reload(
    channel: grpc.aio.Channel, model: str, ref: str
) -> admin.ReloadModelResponse | grpc.aio.AioRpcError:
    try:
        reply: admin.ReloadModelResponse = await admin_grpc.AdminServiceStub(channel).ReloadModel(
            admin.ReloadModelRequest(model=model, ref=ref), timeout=60
        )
        return reply
    except grpc.aio.AioRpcError as exc:
        return exc


def _refused(outcome: object, *named: str) -> str:
    assert isinstance(outcome, grpc.aio.AioRpcError), outcome
    assert outcome.code() == grpc.StatusCode.FAILED_PRECONDITION, outcome
    details = outcome.details() or ""
    for text in named:
        assert text in details, details
    return details


async def test_external_data_serves_until_overwritten_then_reload_refuses_it(
    start_app: AppFactory, registry: Path
) -> None:
    """The issue's case: weights.bin rewritten in place (same size, same mtime) after the
    version was loaded once. The reload that used to serve the new weights is refused."""
    app = await start_app(models=("churn_mlp@1",), registry=registry)
    x = _rows(registry)
    sklearn = load_holdout(registry, "churn_mlp", "1").probabilities[: len(x)]
    weights = registry / "churn_mlp" / "2" / "weights.bin"
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as channel:
        infer = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer
        v1 = probabilities(await infer(infer_request(x, "churn_mlp"), timeout=30))

        loaded = await _reload(channel, "churn_mlp", "churn_mlp@2")
        assert isinstance(loaded, admin.ReloadModelResponse), loaded
        assert (loaded.previous_version, loaded.version) == ("1", "2")
        reply = await infer(infer_request(x, "churn_mlp"), timeout=30)
        assert reply.model_version == "2"
        np.testing.assert_array_equal(probabilities(reply), v1)  # the same weights, moved
        np.testing.assert_allclose(probabilities(reply), sklearn, atol=1e-4)

        assert isinstance(
            await _reload(channel, "churn_mlp", "churn_mlp@1"), admin.ReloadModelResponse
        )
        tamper_in_place(weights)
        details = _refused(
            await _reload(channel, "churn_mlp", "churn_mlp@2"), str(weights), "sha256"
        )
        assert "register the model again" in details

        reply = await infer(infer_request(x, "churn_mlp"), timeout=30)
        assert reply.model_version == "1"
        np.testing.assert_array_equal(probabilities(reply), v1)
        (status,) = app.models.status("churn_mlp")
        assert (status.version, status.failed_reloads) == ("1", 1)
        assert str(weights) in status.last_error


@pytest.mark.parametrize(
    ("planted", "named"),
    [
        ("feature_view.json", "sha256"),  # the registered feature view, edited
        ("model.onnx.data", "is not in the version's manifest"),  # a file nobody registered
    ],
)
async def test_a_tampered_or_planted_file_is_refused_by_reload_and_v1_keeps_serving(
    start_app: AppFactory, registry: Path, planted: str, named: str
) -> None:
    app = await start_app(models=("churn@1",), registry=registry)
    path = registry / "churn" / "2" / planted
    if path.exists():
        path.write_text(
            path.read_text().replace('"missing_entity": "default"', '"missing_entity": "error"')
        )
    else:
        path.write_bytes(b"\x00" * 64)
    x = _rows(registry)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as channel:
        _refused(await _reload(channel, "churn", "churn@2"), str(path), named)
        reply = await pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
            infer_request(x, "churn"), timeout=30
        )
        assert (reply.model_name, reply.model_version) == ("churn", "1")


async def test_start_up_refuses_a_tampered_version_naming_the_file(
    start_app: AppFactory, registry: Path
) -> None:
    weights = registry / "churn_mlp" / "2" / "weights.bin"
    tamper_in_place(weights)
    with pytest.raises(FailedPrecondition, match=str(weights)):
        await start_app(models=("churn_mlp@2",), registry=registry)
    view = registry / "churn" / "2" / "feature_view.json"
    view.write_text(view.read_text() + " ")
    with pytest.raises(FailedPrecondition, match=str(view)):
        await start_app(models=("churn@2",), registry=registry)


def test_a_served_process_refuses_tampered_versions_and_keeps_serving(
    registry: Path, tmp_path: Path
) -> None:
    """`batchline serve` as its own process: tampered versions are refused at start-up (exit
    2, the file named) and by ReloadModel over gRPC; the process serves on and exits 0."""
    import asyncio

    weights = registry / "churn_mlp" / "2" / "weights.bin"
    view = registry / "churn" / "2" / "feature_view.json"
    tamper_in_place(weights)
    view.write_text(view.read_text().replace("demo customers", "someone else's customers"))

    with pytest.raises(RuntimeError, match="server exited with 2") as exited:
        spawn_server(registry, tmp_path, "--model", "churn_mlp@2")
    assert str(weights) in str(exited.value)
    assert "Traceback" not in str(exited.value)

    server = spawn_server(registry, tmp_path)
    try:

        async def scenario() -> None:
            x = _rows(registry)
            async with grpc.aio.insecure_channel(server.address) as channel:
                _refused(await _reload(channel, "churn_mlp", "churn_mlp@2"), str(weights))
                _refused(await _reload(channel, "churn", "churn@2"), str(view))
                infer = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer
                for model in ("churn", "churn_mlp"):
                    reply = await infer(infer_request(x, model), timeout=30)
                    assert (reply.model_name, reply.model_version) == (model, "1")

        asyncio.run(scenario())
    finally:
        assert server.terminate() == 0, server.log.read_text()


def test_the_drift_sidecar_refuses_a_tampered_profile(
    registry: Path, caplog: pytest.LogCaptureFixture
) -> None:
    load = registry_profiles(registry)
    assert load("churn", "2") is not None
    profile = registry / "churn" / "2" / "profile.json"
    profile.write_text(profile.read_text().replace("1", "2", 1))
    with caplog.at_level(logging.WARNING):
        assert registry_profiles(registry)("churn", "2") is None
    assert any(
        str(profile) in r.getMessage() and "sha256" in r.getMessage() for r in caplog.records
    )
