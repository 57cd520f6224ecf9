"""Real servers for integration tests: in-process Apps and `batchline serve` subprocesses,
always on 127.0.0.1 port 0 with the bound port read back."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from registry_client import FileRegistry
from server._proto import inference_pb2_grpc as pb_grpc
from server.app import App
from server.clock import Clock
from server.config import load_settings

ROOT = Path(__file__).resolve().parents[2]
AppFactory = Callable[..., Awaitable[App]]


def register_with_attachment(root: Path, name: str, version: str, filename: str, text: str) -> None:
    """Make `name`@`version` in the registry at `root` a version registered with `text` as its
    attachment `filename` (the same model and other files). Editing the file in place would be
    tampering, which the registry refuses: the version is registered afresh in a scratch
    registry and its folder (files and manifest) takes the old one's place."""
    store = FileRegistry(root)
    mv = store.get_version(name, version)
    folder = Path(mv.artifact).parent
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / filename
        source.write_text(text)
        attachments = {
            f: store.attachment(name, version, f)
            for f in mv.files
            if f not in {"model.onnx", *mv.external_data}
        }
        new = FileRegistry(Path(tmp) / "scratch").register(
            name,
            store.fetch(mv),
            signature=mv.signature,
            metrics=mv.metrics,
            tags=mv.tags,
            features=mv.features,
            source=mv.source,
            description=mv.description,
            attachments={**attachments, filename: source},
        )
        shutil.rmtree(folder)
        shutil.move(Path(new.artifact).parent, folder)


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


@dataclass
class ServerProcess:
    proc: subprocess.Popen[bytes]
    grpc_port: int
    metrics_port: int
    log: Path
    http_port: int = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def terminate(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise


def spawn_server(
    registry: Path, workdir: Path, *extra: str, timeout: float = 60.0
) -> ServerProcess:
    """Run `batchline serve` in its own process and wait (bounded) for its ready file."""
    ready = workdir / f"ready-{time.monotonic_ns()}.json"
    log = ready.with_suffix(".log")
    cmd = [
        sys.executable, "-m", "server.cli", "serve",
        "--registry", str(registry),
        "--host", "127.0.0.1", "--grpc-port", "0", "--http-port", "0", "--metrics-port", "0",
        "--ready-file", str(ready),
        *extra,
    ]  # fmt: skip
    if not any(a == "--model" for a in extra):
        cmd += ["--model", "churn@production", "--model", "churn_mlp@production"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + timeout
    while not ready.exists():
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read_text()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise TimeoutError(f"server not ready after {timeout}s:\n{log.read_text()}")
        time.sleep(0.05)
    info = json.loads(ready.read_text())
    return ServerProcess(
        proc, info["grpc_port"], info["metrics_port"], log, info.get("http_port", 0)
    )


@pytest.fixture(scope="session")
def server_process(
    demo_registry: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    """One `batchline serve` subprocess shared by read-only tests (tritonclient, perf tools)."""
    server = spawn_server(demo_registry, tmp_path_factory.mktemp("server"))
    yield server
    assert server.terminate() == 0, server.log.read_text()


class RedisServer:
    """A real redis-server on a free port, owned by one test: kill, pause and restart it."""

    def __init__(self, workdir: Path) -> None:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        import redis

        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.workdir)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        client = redis.Redis(port=self.port, socket_timeout=0.2)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.exceptions.RedisError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError("redis-server did not start") from None
                time.sleep(0.02)
        client.close()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def pause(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A fresh redis-server for this test (a missing redis-server binary is an error)."""
    server = RedisServer(tmp_path)
    yield server
    server.resume()
    server.kill()
