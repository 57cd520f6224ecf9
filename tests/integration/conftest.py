"""Real servers for integration tests: in-process Apps and `batchline serve` subprocesses,
always on 127.0.0.1 port 0 with the bound port read back (the processes: tests/support)."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from server._proto import inference_pb2_grpc as pb_grpc
from server.app import App
from server.clock import Clock
from server.config import load_settings
from tests.support.apps import AppFactory
from tests.support.processes import RedisServer, ServerProcess, Sidecar, serving


def _transport() -> dict[str, str]:
    chosen = os.environ.get("BATCHLINE_SERVER__GRPC_TRANSPORT", "")
    return {"grpc_transport": chosen} if chosen else {}


@pytest.fixture
async def start_app(demo_registry: Path) -> AsyncIterator[AppFactory]:
    """Start an in-process App on free ports; keyword arguments override model settings
    (max_batch_size=..., dynamic_batching=False, ...); `models=` picks the refs."""
    apps: list[App] = []

    async def start(
        models: tuple[str, ...] = ("churn@production", "churn_mlp@production"),
        config: str | None = None,
        grace_period_s: float = 5.0,
        registry: Path | None = None,
        server: dict[str, Any] | None = None,
        clock: Clock | None = None,
        **model_overrides: Any,
    ) -> App:
        settings = load_settings(
            config,
            server_overrides={
                "registry": str(registry or demo_registry),
                "host": "127.0.0.1",
                "grpc_port": 0,
                "http_port": 0,
                "metrics_port": 0,
                "grace_period_s": grace_period_s,
                "poll_interval_s": 0.0,
                "deployment": os.environ["BATCHLINE_DEPLOYMENT"],
                # Freezing the heap is a full collection of the whole pytest process per App:
                # the tests of server/heap.py (and the retirement test) turn it on.
                "gc_freeze": False,
                # The suite runs on either gRPC transport (BATCHLINE_SERVER__GRPC_TRANSPORT, as
                # for the subprocess servers, which read it from their environment).
                **_transport(),
                **(server or {}),
            },
            model_refs=models,
            model_overrides=model_overrides,
        )
        app = App(settings, clock=clock)
        await app.start()
        apps.append(app)
        return app

    yield start
    for app in apps:
        await app.stop(grace=1.0)


@pytest.fixture
async def app(start_app: AppFactory) -> App:
    return await start_app()


@pytest.fixture
async def stub(app: App) -> AsyncIterator[pb_grpc.GRPCInferenceServiceStub]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)


@pytest.fixture(scope="session")
def server_process(
    demo_registry: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    """One `batchline serve` subprocess shared by read-only tests (tritonclient, perf tools)."""
    with serving(demo_registry, tmp_path_factory.mktemp("server")) as server:
        yield server


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A fresh redis-server for this test (a missing redis-server binary is an error)."""
    server = RedisServer(tmp_path)
    yield server
    server.resume()
    server.kill()


@pytest.fixture
def sidecars() -> Iterator[list[Sidecar]]:
    """Drift sidecars a test starts (tests.support.processes.spawn_sidecar); whatever is still
    running at the end is killed."""
    started: list[Sidecar] = []
    yield started
    for sidecar in started:
        sidecar.kill()
