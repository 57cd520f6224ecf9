"""Admin RPCs are closed by default: every one of them (AdminService and Triton's repository
load/unload) with no token, a wrong token and the right one, on a loopback host and on 0.0.0.0.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from server._proto import admin_pb2 as admin
from server._proto import admin_pb2_grpc as admin_grpc
from server._proto import inference_pb2 as pb
from server._proto import inference_pb2_grpc as pb_grpc
from server.config import ConfigError, load_settings
from tests.support.apps import AppFactory
from tests.support.requests import infer_request

TOKEN = "t0ken-for-admin"
Call = Callable[[Any, Any], Awaitable[Any]]

# Every admin RPC, as (name, call(channel, metadata)).
ADMIN_CALLS: dict[str, Call] = {
    "ReloadModel": lambda ch, md: admin_grpc.AdminServiceStub(ch).ReloadModel(
        admin.ReloadModelRequest(model="churn"), metadata=md, timeout=10
    ),
    "ModelStatus": lambda ch, md: admin_grpc.AdminServiceStub(ch).ModelStatus(
        admin.ModelStatusRequest(), metadata=md, timeout=10
    ),
    "GetRoute": lambda ch, md: admin_grpc.AdminServiceStub(ch).GetRoute(
        admin.GetRouteRequest(model="churn"), metadata=md, timeout=10
    ),
    "SetRoute": lambda ch, md: admin_grpc.AdminServiceStub(ch).SetRoute(
        admin.RouteSpec(model="churn"), metadata=md, timeout=10
    ),
    "RepositoryModelLoad": lambda ch, md: pb_grpc.GRPCInferenceServiceStub(ch).RepositoryModelLoad(
        pb.RepositoryModelLoadRequest(model_name="churn"), metadata=md, timeout=10
    ),
    "RepositoryModelUnload": lambda ch, md: pb_grpc.GRPCInferenceServiceStub(
        ch
    ).RepositoryModelUnload(
        pb.RepositoryModelUnloadRequest(model_name="churn"), metadata=md, timeout=10
    ),
}
# What an authorised call answers (Unload is refused on purpose: models are fixed at start).
AUTHORISED = {name: grpc.StatusCode.OK for name in ADMIN_CALLS}
AUTHORISED["RepositoryModelUnload"] = grpc.StatusCode.FAILED_PRECONDITION


async def _code(call: Call, channel: Any, metadata: Any) -> tuple[grpc.StatusCode, str]:
    try:
        await call(channel, metadata)
    except grpc.aio.AioRpcError as exc:
        return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""


def _bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


@pytest.mark.parametrize("name", sorted(ADMIN_CALLS))
async def test_with_a_token_every_admin_rpc_needs_it(start_app: AppFactory, name: str) -> None:
    app = await start_app(models=("churn@production",), server={"admin_token": TOKEN})
    call = ADMIN_CALLS[name]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as channel:
        assert (await _code(call, channel, None))[0] == grpc.StatusCode.UNAUTHENTICATED
        wrong = await _code(call, channel, _bearer("nope"))
        assert wrong[0] == grpc.StatusCode.UNAUTHENTICATED
        assert (await _code(call, channel, _bearer(TOKEN)))[0] == AUTHORISED[name]


@pytest.mark.parametrize("name", sorted(ADMIN_CALLS))
async def test_without_a_token_on_a_public_host_every_admin_rpc_is_refused(
    start_app: AppFactory, name: str
) -> None:
    # Bound to every address, reached (like every test here) over loopback only.
    app = await start_app(models=("churn@production",), server={"host": "0.0.0.0"})
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as channel:
        code, message = await _code(ADMIN_CALLS[name], channel, None)
        assert code == grpc.StatusCode.PERMISSION_DENIED
        assert "BATCHLINE_ADMIN_TOKEN" in message
        assert "admin_token_file" in message
        assert (await _code(ADMIN_CALLS[name], channel, _bearer("guess")))[0] == code
        # Inference is not admin: it answers as ever.
        request = infer_request(np.zeros((1, 15), np.float32), "churn")
        await pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=10)


async def test_admin_insecure_opens_a_public_host_without_a_token(
    start_app: AppFactory, caplog: pytest.LogCaptureFixture
) -> None:
    app = await start_app(
        models=("churn@production",), server={"host": "0.0.0.0", "admin_insecure": True}
    )
    assert "admin RPCs are open to any caller" in caplog.text
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as channel:
        for name, call in ADMIN_CALLS.items():
            assert (await _code(call, channel, None))[0] == AUTHORISED[name], name


async def test_without_a_token_on_loopback_admin_is_open(start_app: AppFactory) -> None:
    app = await start_app(models=("churn@production",))  # host 127.0.0.1
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as channel:
        for name, call in ADMIN_CALLS.items():
            assert (await _code(call, channel, None))[0] == AUTHORISED[name], name


async def test_the_token_can_come_from_a_file(start_app: AppFactory, tmp_path: Path) -> None:
    secret = tmp_path / "admin-token"
    secret.write_text(TOKEN + "\n")
    app = await start_app(
        models=("churn@production",),
        server={"host": "0.0.0.0", "admin_token_file": str(secret)},
    )
    call = ADMIN_CALLS["ModelStatus"]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as channel:
        assert (await _code(call, channel, None))[0] == grpc.StatusCode.UNAUTHENTICATED
        assert (await _code(call, channel, _bearer(TOKEN)))[0] == grpc.StatusCode.OK


def test_an_unreadable_or_empty_token_file_is_a_config_error_naming_it(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(ConfigError, match=r"server\.admin_token_file: cannot read .*nope"):
        load_settings(None, server_overrides={"admin_token_file": str(missing)})
    empty = tmp_path / "empty"
    empty.write_text("\n")
    with pytest.raises(ConfigError, match=r"server\.admin_token_file: .*empty is empty"):
        load_settings(None, server_overrides={"admin_token_file": str(empty)})


def test_the_table_covers_every_admin_rpc_the_server_guards() -> None:
    """A new AdminService method (or a new guarded inference method) must join ADMIN_CALLS."""
    from server.api.server import ADMIN_METHODS

    service = admin.DESCRIPTOR.services_by_name["AdminService"]
    assert set(ADMIN_CALLS) == {m.name for m in service.methods} | ADMIN_METHODS
