"""Hot reload: a swap under load loses nothing, and a bad new version never replaces a good one."""

from __future__ import annotations

import asyncio
import gc
import itertools
import shutil
import weakref
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from prometheus_client import generate_latest

from registry_client import FileRegistry, Signature, TensorInfo
from server._proto import admin_pb2 as admin
from server._proto import admin_pb2_grpc as admin_grpc
from server._proto import inference_pb2_grpc as pb_grpc
from server.app import App
from server.errors import FailedPrecondition, InvalidArgument, ModelError
from tests.support.apps import AppFactory
from tests.support.polling import eventually
from tests.support.requests import infer_request

TOKEN = "s3cret-admin-token"


@pytest.fixture
def registry(demo_registry: Path, tmp_path: Path) -> Path:
    """A writable copy of the demo registry (tests move its aliases)."""
    root = tmp_path / "registry"
    shutil.copytree(demo_registry, root)
    return root


async def _load(
    stub: pb_grpc.GRPCInferenceServiceStub, clients: int, until: asyncio.Event
) -> tuple[list[list[str]], list[grpc.StatusCode]]:
    """Closed-loop clients until `until` is set: each records the version that answered it."""
    errors: list[grpc.StatusCode] = []
    sequences: list[list[str]] = [[] for _ in range(clients)]

    async def client(seq: list[str]) -> None:
        request = infer_request(np.ones((1, 15), np.float32))
        while not until.is_set():
            try:
                reply = await stub.ModelInfer(request, timeout=10)
                seq.append(reply.model_version)
            except grpc.aio.AioRpcError as exc:
                errors.append(exc.code())

    await asyncio.gather(*(client(s) for s in sequences))
    return sequences, errors


def _switches(seq: list[str]) -> int:
    return sum(1 for a, b in itertools.pairwise(seq) if a != b)


async def _after_requests(app: App, name: str, count: int) -> None:
    """Wait (bounded) until `count` more requests were answered by the current version."""
    stats = app.models.get(name).stats
    target = stats.success.count + count
    await eventually(
        lambda: stats.success.count >= target, timeout=10, what="load progressing", every=0.005
    )


async def _run_with_load(
    app: App, action: Callable[[], Awaitable[None]]
) -> tuple[list[list[str]], list[grpc.StatusCode]]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        done = asyncio.Event()
        load = asyncio.create_task(_load(stub, 16, done))
        await _after_requests(app, "churn", 200)
        await action()
        await _after_requests(app, "churn", 200)
        done.set()
        return await load


async def test_swap_under_load_loses_no_request_and_switches_each_client_once(
    start_app: AppFactory, registry: Path
) -> None:
    app = await start_app(models=("churn@production",), registry=registry)

    async def promote() -> None:
        FileRegistry(registry).set_alias("churn", "production", "2")
        outcome = await app.models.reload("churn")
        assert (outcome.previous_version, outcome.version, outcome.changed) == ("1", "2", True)

    sequences, errors = await _run_with_load(app, promote)
    assert errors == []
    for seq in sequences:
        assert seq[0] == "1"
        assert seq[-1] == "2"
        assert _switches(seq) == 1
    assert app.models.get("churn").key.version == "2"


async def test_promote_then_rollback_under_load_switches_each_client_twice(
    start_app: AppFactory, registry: Path
) -> None:
    app = await start_app(models=("churn@production",), registry=registry)
    store = FileRegistry(registry)

    async def promote_and_roll_back() -> None:
        store.set_alias("churn", "production", "2")
        await app.models.reload("churn")
        await _after_requests(app, "churn", 200)
        previous = store.alias_history("churn", "production")[-2][0]
        store.set_alias("churn", "production", previous)
        await app.models.reload("churn")

    sequences, errors = await _run_with_load(app, promote_and_roll_back)
    assert errors == []
    for seq in sequences:
        assert seq[0] == "1"
        assert seq[-1] == "1"
        assert _switches(seq) == 2


async def test_watcher_follows_an_alias_move_without_being_asked(
    start_app: AppFactory, registry: Path
) -> None:
    app = await start_app(
        models=("churn@production",), registry=registry, server={"poll_interval_s": 0.05}
    )
    FileRegistry(registry).set_alias("churn", "production", "2")
    await eventually(
        lambda: app.models.get("churn").key.version == "2", timeout=4, what="the swap to 2"
    )
    assert app.models.get("churn").key.version == "2"
    assert app.models.status("churn")[0].reloads == 1


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _register_copy(store: FileRegistry, source: Path, signature: Signature | None = None) -> str:
    mv = store.get_version("churn", "1")
    new = store.register(
        "churn", source, signature=signature or mv.signature, features=mv.features, source="test"
    )
    return new.version


async def _assert_old_keeps_serving(
    app: App, stub: pb_grpc.GRPCInferenceServiceStub, message: str
) -> None:
    with pytest.raises(FailedPrecondition, match=message):
        await app.models.reload("churn")
    reply = await stub.ModelInfer(infer_request(np.ones((1, 15), np.float32)), timeout=10)
    assert reply.model_version == "1"
    (status,) = app.models.status("churn")
    assert status.failed_reloads == 1
    assert status.last_error
    assert status.version == "1"


async def test_corrupt_artifact_is_refused_and_the_old_version_keeps_serving(
    start_app: AppFactory, registry: Path
) -> None:
    app = await start_app(models=("churn@production",), registry=registry)
    store = FileRegistry(registry)
    version = _register_copy(store, store.fetch(store.get_version("churn", "2")))
    _flip_a_byte(Path(store.get_version("churn", version).artifact))
    store.set_alias("churn", "production", version)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as channel:
        await _assert_old_keeps_serving(app, pb_grpc.GRPCInferenceServiceStub(channel), "sha256")


async def test_missing_version_is_refused_and_the_old_version_keeps_serving(
    start_app: AppFactory, registry: Path
) -> None:
    app = await start_app(models=("churn@production",), registry=registry)
    store = FileRegistry(registry)
    store.set_alias("churn", "production", "2")
    shutil.rmtree(registry / "churn" / "2")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as channel:
        await _assert_old_keeps_serving(app, pb_grpc.GRPCInferenceServiceStub(channel), "2")


async def test_incompatible_signature_is_refused_and_the_old_version_keeps_serving(
    start_app: AppFactory, registry: Path, tmp_path: Path
) -> None:
    from skl2onnx import to_onnx
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(0)
    X = rng.random((200, 10), dtype=np.float32)
    model = LogisticRegression().fit(X, (X[:, 0] > 0.5).astype(np.int64))
    onx = to_onnx(model, X[:1], options={id(model): {"zipmap": False}})
    path = tmp_path / "ten_features.onnx"
    path.write_bytes(onx.SerializeToString())
    store = FileRegistry(registry)
    signature = Signature(
        inputs=(TensorInfo("X", "FP32", (-1, 10)),),
        outputs=(TensorInfo("label", "INT64", (-1,)), TensorInfo("probabilities", "FP32", (-1, 2))),
    )
    version = _register_copy(store, path, signature)
    store.set_alias("churn", "production", version)
    app = await start_app(models=("churn@1",), registry=registry)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(FailedPrecondition, match="not compatible"):
            await app.models.reload("churn", f"churn@{version}")
        reply = await stub.ModelInfer(infer_request(np.ones((1, 15), np.float32)), timeout=10)
        assert reply.model_version == "1"


async def test_a_reload_ref_must_name_the_served_model(
    start_app: AppFactory, registry: Path
) -> None:
    app = await start_app(models=("churn@1",), registry=registry)
    with pytest.raises(InvalidArgument, match=r"names registry model 'churn_mlp'.*serves 'churn'"):
        await app.models.reload("churn", "churn_mlp@1")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as channel:
        stub = admin_grpc.AdminServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.ReloadModel(
                admin.ReloadModelRequest(model="churn", ref="churn_mlp@1"), timeout=10
            )
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "ref:" in (refused.value.details() or "")
        reply = await pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
            infer_request(np.ones((1, 15), np.float32)), timeout=10
        )
        assert (reply.model_name, reply.model_version) == ("churn", "1")


async def test_admin_reload_needs_the_bearer_token_and_reports_status(
    start_app: AppFactory, registry: Path
) -> None:
    app = await start_app(
        models=("churn@production",), registry=registry, server={"admin_token": TOKEN}
    )
    FileRegistry(registry).set_alias("churn", "production", "2")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as channel:
        stub = admin_grpc.AdminServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as denied:
            await stub.ReloadModel(admin.ReloadModelRequest(model="churn"), timeout=10)
        assert denied.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.aio.AioRpcError) as wrong:
            await stub.ReloadModel(
                admin.ReloadModelRequest(model="churn"),
                metadata=(("authorization", "Bearer nope"),),
                timeout=10,
            )
        assert wrong.value.code() == grpc.StatusCode.UNAUTHENTICATED
        auth = (("authorization", f"Bearer {TOKEN}"),)
        reply = await stub.ReloadModel(
            admin.ReloadModelRequest(model="churn"), metadata=auth, timeout=10
        )
        assert (reply.previous_version, reply.version, reply.changed) == ("1", "2", True)
        status = await stub.ModelStatus(
            admin.ModelStatusRequest(model="churn"), metadata=auth, timeout=10
        )
        state = status.models[0]
        expected = FileRegistry(registry).get_version("churn", "2")
        assert (state.version, state.alias, state.sha256, state.state) == (
            "2",
            "production",
            expected.sha256,
            "READY",
        )
        assert state.reloads == 1
        assert state.metrics["roc_auc"] == pytest.approx(expected.metrics["roc_auc"])
        with pytest.raises(grpc.aio.AioRpcError) as unknown:
            await stub.ReloadModel(
                admin.ReloadModelRequest(model="nope"), metadata=auth, timeout=10
            )
        assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
        assert "nope" in (unknown.value.details() or "")


async def test_triton_load_model_reloads_through_the_repository_api(
    start_app: AppFactory, registry: Path
) -> None:
    import tritonclient.grpc.aio as triton

    app = await start_app(models=("churn@production",), registry=registry)
    FileRegistry(registry).set_alias("churn", "production", "2")
    client = triton.InferenceServerClient(f"127.0.0.1:{app.grpc_port}")
    try:
        await client.load_model("churn")
        assert app.models.get("churn").key.version == "2"
        index = await client.get_model_repository_index(as_json=True)
        assert {"name": "churn", "version": "2", "state": "READY"} in index["models"]
    finally:
        await client.close()


async def test_retired_versions_are_released_and_their_metric_series_removed(
    start_app: AppFactory, registry: Path
) -> None:
    """Alternating reloads under traffic: every retired ServedModel is garbage once its queue
    drained (weak references die, with the heap frozen as a served process freezes it), and
    /metrics keeps series of the served version only."""
    app = await start_app(models=("churn@1",), registry=registry, server={"gc_freeze": True})
    retired: list[weakref.ref[Any]] = []
    runtimes = []  # held on purpose: retiring must release their sessions even so
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        for ref in ["churn@2", "churn@1"] * 4:
            retired.append(weakref.ref(app.models.get("churn")))
            runtimes.append(app.models.get("churn").runtime)
            await app.models.reload("churn", ref)
            replies = await asyncio.gather(
                *(
                    stub.ModelInfer(infer_request(np.ones((1, 15), np.float32)), timeout=10)
                    for _ in range(20)
                )
            )
            assert {r.model_version for r in replies} == {ref.split("@")[1]}
    await app.models.drain()  # the retirements have run
    # ...and the heap settle they scheduled (it unfreezes, so what the retired versions held is
    # collectable again; a frozen object is skipped by gc.collect, not referenced)
    await eventually(lambda: not app._settle_pending, timeout=10.0, what="the heap settle")
    gc.collect()
    alive = [r() for r in retired if r() is not None]
    assert alive == [], f"{len(alive)} retired versions still referenced"
    assert all(r._session is None for r in runtimes)  # released at retirement, not at GC
    with pytest.raises(ModelError):
        runtimes[0].run({"input": np.zeros((1, 15), np.float32)})
    served = app.models.get("churn")
    assert served.key.version == "1"
    text = generate_latest(app.metrics.registry).decode()
    info = [line for line in text.splitlines() if line.startswith("batchline_model_info{")]
    assert len(info) == 1, info
    assert 'version="1"' in info[0]
    queue = [line for line in text.splitlines() if line.startswith("batchline_queue_rows{")]
    assert len(queue) == 1, queue
    assert 'version="1"' in queue[0]
    assert 'batchline_requests_total{model="churn",status="OK",version="2"}' not in text
