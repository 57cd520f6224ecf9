"""Control state in the registry: replicas of one deployment converge on one route and ref;
a replica started later serves them from the start; another deployment is left alone."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from registry_client import FileRegistry
from registry_client.control import FileControlStore
from server._proto import admin_pb2 as admin
from server._proto import admin_pb2_grpc as admin_grpc
from server.app import App
from tests.support.apps import AppFactory
from tests.support.polling import eventually


async def _set_route(app: App, **route: object) -> admin.RouteSpec:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as channel:
        return await admin_grpc.AdminServiceStub(channel).SetRoute(
            admin.RouteSpec(model="churn", **route), timeout=60
        )


async def test_replicas_converge_on_the_route_and_the_ref_set_on_one_of_them(
    start_app: AppFactory, demo_registry: Path, control_deployment: str
) -> None:
    registry = demo_registry  # control state is per deployment: this test's own
    server = {"poll_interval_s": 0.2, "deployment": control_deployment}
    a = await start_app(models=("churn@production",), registry=registry, server=server)
    b = await start_app(models=("churn@production",), registry=registry, server=server)

    await _set_route(a, canary="2", canary_percent=25.0)
    route_a = a.models.route("churn")
    assert route_a is not None
    await eventually(lambda: b.models.route("churn") == route_a, timeout=20, what="b on route a")
    assert b.models.get("churn", "2").key.version == "2"  # the canary is loaded there too

    async with grpc.aio.insecure_channel(f"127.0.0.1:{b.grpc_port}") as channel:
        reply = await admin_grpc.AdminServiceStub(channel).ReloadModel(
            admin.ReloadModelRequest(model="churn", ref="churn@2"), timeout=60
        )
    assert reply.version == "2"
    await eventually(
        lambda: a.models.get("churn").key.version == "2", timeout=20, what="a serving 2"
    )
    assert a.models.status("churn")[0].ref == "churn@2"
    # The canary became the primary on both: no route left pointing at it.
    assert a.models.route("churn") == b.models.route("churn")

    # A replica started now serves the stored ref and route from its first request.
    await _set_route(a, canary="1", canary_percent=10.0)
    c = await start_app(models=("churn@production",), registry=registry, server=server)
    assert c.models.get("churn").key.version == "2"
    route_c = c.models.route("churn")
    assert route_c is not None
    assert (route_c.canary, route_c.canary_percent) == ("1", 10.0)

    # Another deployment on the same registry is not touched by any of this.
    other = await start_app(
        models=("churn@production",),
        registry=registry,
        server={"deployment": f"{control_deployment}-staging"},
    )
    assert other.models.get("churn").key.version == "1"
    assert other.models.route("churn") is None


async def test_a_refused_route_is_not_written(
    start_app: AppFactory, demo_registry: Path, control_deployment: str
) -> None:
    registry = demo_registry
    server = {"deployment": control_deployment}
    a = await start_app(models=("churn@production",), registry=registry, server=server)
    store = FileControlStore(FileRegistry(registry), control_deployment)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{a.grpc_port}") as channel:
        stub = admin_grpc.AdminServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.SetRoute(admin.RouteSpec(model="churn", canary="9"), timeout=60)
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "9" in (refused.value.details() or "")
    assert store.read("churn").generation == 0
