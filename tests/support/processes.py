"""Real processes for tests, always on 127.0.0.1 with the bound port read back: `batchline
serve`, the drift sidecar, redis-server, MLflow, the echo server and the nginx front.

The mechanics (ready files, port waits, stop, /proc accounting) are bench/processes.py's, the
same the benches use; what is here is what a test needs on top: the flags tests run with,
killing, pausing and restarting, and exit codes asserted on the way out.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from bench.processes import (
    ROOT,
    Nginx,
    free_port,
    free_ports,
    nginx_binary,
    start_nginx,
    start_with_ready_file,
    stop,
)
from tests.support.polling import eventually_blocking

__all__ = [
    "ROOT",
    "MlflowServer",
    "Nginx",
    "RedisServer",
    "ServerProcess",
    "Sidecar",
    "free_port",
    "free_ports",
    "nginx_binary",
    "serving",
    "spawn_echo",
    "spawn_server",
    "spawn_sidecar",
    "start_nginx",
]


# ---- batchline serve -------------------------------------------------------------------------


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
        """SIGTERM and the exit code; killed (and TimeoutExpired raised) past `timeout`."""
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
    """Run `batchline serve` in its own process and wait (bounded) for its ready file; a
    server that exits first raises "server exited with CODE" and its log."""
    ready = workdir / f"ready-{time.monotonic_ns()}.json"
    log = ready.with_suffix(".log")
    cmd = [
        sys.executable, "-m", "server.cli", "serve",
        "--registry", str(registry),
        "--host", "127.0.0.1", "--grpc-port", "0", "--http-port", "0", "--metrics-port", "0",
        *extra,
    ]  # fmt: skip
    if not any(a == "--model" for a in extra):
        cmd += ["--model", "churn@production", "--model", "churn_mlp@production"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc, info = start_with_ready_file("server", cmd, ready, log, timeout_s=timeout, env=env)
    return ServerProcess(
        proc, info["grpc_port"], info["metrics_port"], log, info.get("http_port", 0)
    )


@contextmanager
def serving(registry: Path, workdir: Path, *extra: str) -> Iterator[ServerProcess]:
    """`spawn_server` for a with-block, which must end with the server exiting 0 on SIGTERM."""
    server = spawn_server(registry, workdir, *extra)
    try:
        yield server
    finally:
        code = server.terminate()
    assert code == 0, server.log.read_text()


# ---- the drift sidecar -----------------------------------------------------------------------


@dataclass
class Sidecar:
    proc: subprocess.Popen[bytes]
    grpc_port: int
    http_port: int
    log: Path

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def get(self, path: str) -> bytes:
        url = f"http://127.0.0.1:{self.http_port}{path}"
        with urllib.request.urlopen(url, timeout=10) as response:
            body: bytes = response.read()
        return body

    def report(self) -> dict[str, object]:
        doc: dict[str, object] = json.loads(self.get("/report.json?refresh=1"))
        return doc

    def window(self, model: str = "churn", version: str = "1") -> dict[str, object]:
        for window in self.report()["windows"]:  # type: ignore[attr-defined]
            if (window["model"], window["version"], window["role"]) == (model, version, "primary"):
                return dict(window)
        return {"records_total": 0}

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def spawn_sidecar(
    registry: Path,
    workdir: Path,
    grpc_port: int = 0,
    *extra: str,
    host: str | None = "127.0.0.1",
    env: dict[str, str] | None = None,
) -> Sidecar:
    """`python -m server.drift.sidecar` on free ports (`host=None`: no --host, the default
    bind), with small windows so tests see evaluations; `extra` flags and `env` variables
    are added (BATCHLINE_DRIFT_* of whoever runs the tests are not)."""
    ready = workdir / f"drift-ready-{time.monotonic_ns()}.json"
    log = ready.with_suffix(".log")
    cmd = [
        sys.executable, "-m", "server.drift.sidecar",
        "--registry", str(registry),
        *(("--host", host) if host is not None else ()),
        "--grpc-port", str(grpc_port), "--http-port", "0",
        "--window-rows", "2000", "--min-rows", "100",
        "--eval-every-records", "500", "--eval-every-s", "1",
        "--alert", "feature_psi > 0.25",
        *extra,
    ]  # fmt: skip
    environ = {k: v for k, v in os.environ.items() if not k.startswith("BATCHLINE_DRIFT_")}
    proc, info = start_with_ready_file(
        "sidecar", cmd, ready, log, timeout_s=30, env={**environ, **(env or {})}
    )
    assert info["pid"] == proc.pid
    return Sidecar(proc, info["grpc_port"], info["http_port"], log)


# ---- redis-server ----------------------------------------------------------------------------


class RedisServer:
    """A real redis-server on a free port, owned by one test: kill, pause and restart it."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        import redis

        proc = self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.workdir)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        client = redis.Redis(port=self.port, socket_timeout=0.2)

        def answers() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {proc.returncode}")
            try:
                return bool(client.ping())
            except redis.exceptions.RedisError:
                return False

        try:
            eventually_blocking(answers, timeout=10, what="redis-server answering PING")
        finally:
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


# ---- MLflow ----------------------------------------------------------------------------------


MLFLOW_STARTUP_TIMEOUT_S = 90.0


@dataclass
class MlflowServer:
    """An `mlflow server` subprocess on a fixed port, killable and restartable."""

    root: Path
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    startup_s: list[float] = field(default_factory=list)
    _started_at: float = 0.0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log(self) -> Path:
        return self.root / "mlflow.log"

    def launch(self) -> None:
        mlflow = shutil.which("mlflow", path=str(Path(sys.executable).parent)) or "mlflow"
        cmd = [
            mlflow, "server",
            "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
            "--artifacts-destination", str(self.root / "artifacts"),
            "--host", "127.0.0.1", "--port", str(self.port),
            "--workers", "1",
        ]  # fmt: skip
        # No background job runner: it forks several huey consumers that tests never need.
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                cmd, cwd=self.root, stdout=out, stderr=subprocess.STDOUT, env=env,
                start_new_session=True,  # its own process group: uvicorn workers die with it
            )  # fmt: skip
        self._started_at = time.monotonic()

    def wait_ready(self) -> None:
        """Until /health answers 200 (bounded from the launch); the start-up time recorded."""
        proc = self.proc
        assert proc is not None

        def healthy() -> bool:
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=1) as reply:
                    if reply.status == 200:
                        return True
            except OSError:
                pass
            if proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited {proc.returncode}:\n{self._tail()}")
            return False

        left = self._started_at + MLFLOW_STARTUP_TIMEOUT_S - time.monotonic()
        try:
            eventually_blocking(healthy, timeout=max(left, 0.0), what="mlflow /health", every=0.1)
        except AssertionError:
            self.kill()
            raise TimeoutError(
                f"mlflow server not up in {MLFLOW_STARTUP_TIMEOUT_S}s:\n{self._tail()}"
            ) from None
        self.startup_s.append(time.monotonic() - self._started_at)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait()

    def _tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]


# ---- the echo server (bench/echo_server.py) --------------------------------------------------


@contextmanager
def spawn_echo(workdir: Path) -> Iterator[int]:
    """The V2 echo server on a free port (its gRPC port yielded); stopped with SIGTERM on the
    way out, and it must exit 0 within 15 s."""
    cmd = [sys.executable, "-m", "bench.echo_server", "--port", "0"]
    proc, info = start_with_ready_file(
        "echo server", cmd, workdir / "ready.json", workdir / "echo.log", timeout_s=30
    )
    try:
        assert info["pid"] == proc.pid
        yield int(info["grpc_port"])
    finally:
        code = stop(proc, timeout_s=15)  # killed past 15 s: a negative code, failing below
    assert code == 0, (workdir / "echo.log").read_text()
