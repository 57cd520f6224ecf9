"""The fault-injection harness: real `batchline serve` processes, concurrent grpc.aio clients that
account for every call, metrics read from the server's own endpoint, killable Redis.

Every scenario keeps the same invariant: no hang (each call has a client deadline, each wait is
bounded), no crash (the process is alive at the end and exits 0 on SIGTERM), no silent loss
(calls sent == calls answered OK + calls answered with a status) and recovery without a restart.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest

from server._proto import inference_pb2 as pb
from server._proto import inference_pb2_grpc as pb_grpc
from tests.support.metrics import metric, scrape_async
from tests.support.polling import eventually
from tests.support.processes import RedisServer, ServerProcess, spawn_server

GRACE_S = 10.0


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "fault: a fault-injection scenario against a real server process"
    )


# ---- accounting -----------------------------------------------------------------------------


@dataclass
class Outcome:
    tag: str
    code: str  # a grpc.StatusCode name; "OK" for a reply
    details: str
    started: float  # time.monotonic()
    finished: float
    parameters: dict[str, str] = field(default_factory=dict)
    version: str = ""

    @property
    def seconds(self) -> float:
        return self.finished - self.started


class Tally:
    """Every call a scenario sends, and how each one ended."""

    def __init__(self) -> None:
        self.sent = 0
        self.outcomes: list[Outcome] = []

    async def call(
        self,
        stub: pb_grpc.GRPCInferenceServiceStub,
        request: pb.ModelInferRequest,
        deadline_s: float,
        tag: str = "",
    ) -> Outcome:
        self.sent += 1
        started = time.monotonic()
        try:
            reply = await stub.ModelInfer(request, timeout=deadline_s)
        except grpc.aio.AioRpcError as exc:
            outcome = Outcome(tag, exc.code().name, exc.details() or "", started, time.monotonic())
        else:
            outcome = Outcome(
                tag,
                "OK",
                "",
                started,
                time.monotonic(),
                {k: v.string_param for k, v in reply.parameters.items()},
                reply.model_version,
            )
        self.outcomes.append(outcome)
        return outcome

    def codes(self, keep: Callable[[Outcome], bool] = lambda o: True) -> Counter[str]:
        return Counter(o.code for o in self.outcomes if keep(o))

    def assert_none_lost(self) -> None:
        answered = self.codes()
        ok = answered.pop("OK", 0)
        assert self.sent == ok + sum(answered.values()), (
            f"{self.sent} calls sent, {ok} answered OK and {sum(answered.values())} with a "
            f"status ({dict(answered)}): {self.sent - ok - sum(answered.values())} lost"
        )


MakeRequest = Callable[[int], tuple[pb.ModelInferRequest, str]]


class Load:
    """`workers` coroutines sending `make(i)` back to back on one channel until stopped.

    `make` may be replaced while the load runs (e.g. mixed traffic, then good traffic only).
    `timeout` is each call's deadline in seconds, or a function drawing one per call. A worker
    whose call ends with a code in `stop_on` stops (a client that leaves a server that said so);
    otherwise it carries on.
    """

    def __init__(
        self,
        stub: pb_grpc.GRPCInferenceServiceStub,
        tally: Tally,
        make: MakeRequest,
        *,
        workers: int,
        timeout: float | Callable[[], float],
        stop_on: frozenset[str] = frozenset(),
    ) -> None:
        self.stub = stub
        self.tally = tally
        self.make = make
        self._timeout = timeout if callable(timeout) else lambda: timeout
        self._longest = timeout if not callable(timeout) else 5.0  # drawn ones stay under 5 s
        self.stop_on = stop_on
        self._workers = workers
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._sent = 0

    async def _worker(self) -> None:
        while not self._stop.is_set():
            self._sent += 1
            request, tag = self.make(self._sent)
            outcome = await self.tally.call(self.stub, request, self._timeout(), tag)
            if outcome.code in self.stop_on:
                return
            await asyncio.sleep(0)  # let the other workers and the test run between calls

    async def __aenter__(self) -> Load:
        self._tasks = [asyncio.create_task(self._worker()) for _ in range(self._workers)]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stop.set()
        # Every call carries a deadline, so the workers end within one deadline.
        done, pending = await asyncio.wait(self._tasks, timeout=self._longest + 5)
        for task in pending:
            task.cancel()
        assert not pending, f"{len(pending)} load workers hung past their call deadline"
        for task in done:
            task.result()

    @property
    def finished(self) -> bool:
        return all(t.done() for t in self._tasks)


@asynccontextmanager
async def channel(server: ServerProcess) -> AsyncIterator[pb_grpc.GRPCInferenceServiceStub]:
    async with grpc.aio.insecure_channel(server.address) as ch:
        yield pb_grpc.GRPCInferenceServiceStub(ch)


async def good_batch(
    stub: pb_grpc.GRPCInferenceServiceStub,
    make: Callable[[int], pb.ModelInferRequest],
    n: int,
    concurrency: int = 16,
) -> list[Outcome]:
    """`n` good calls, `concurrency` at a time, each of which must succeed: the recovery check."""
    tally = Tally()
    limit = asyncio.Semaphore(concurrency)

    async def one(i: int) -> None:
        async with limit:
            await tally.call(stub, make(i), 5.0, tag="final")

    await asyncio.gather(*(one(i) for i in range(n)))
    tally.assert_none_lost()
    failed = Counter((o.code, o.details) for o in tally.outcomes if o.code != "OK")
    assert not failed, f"good calls after the fault failed: {dict(failed)}"
    return tally.outcomes


# ---- the server's own view ------------------------------------------------------------------


async def wait_for_metric(
    server: ServerProcess, name: str, value: float, within: float, **labels: str
) -> float:
    """Seconds until the server's own `name{labels}` reads `value` (bounded by `within`)."""

    async def holds() -> bool:
        return metric(await scrape_async(server.metrics_port), name, **labels) == value

    return await eventually(holds, timeout=within, what=f"{name}{labels} == {value}")


# ---- processes ------------------------------------------------------------------------------


class Servers:
    """The servers one test spawns; each must exit 0 on SIGTERM within the grace period."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.spawned: list[ServerProcess] = []

    def start(self, registry: Path, config: str, *models: str, **flags: Any) -> ServerProcess:
        path = self.workdir / f"batchline-{len(self.spawned)}.toml"
        path.write_text(config)
        extra = ["--config", str(path), "--grace-period", str(flags.get("grace", GRACE_S))]
        for model in models:
            extra += ["--model", model]
        server = spawn_server(registry, self.workdir, *extra)
        self.spawned.append(server)
        return server

    @staticmethod
    def alive(server: ServerProcess) -> None:
        assert server.proc.poll() is None, (
            f"the server died (exit {server.proc.returncode}):\n{server.log.read_text()[-4000:]}"
        )

    @staticmethod
    def stop(server: ServerProcess, grace: float = GRACE_S) -> float:
        """SIGTERM; assert exit 0 within the grace period; return the seconds it took."""
        Servers.alive(server)
        start = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        try:
            code = server.proc.wait(timeout=grace + 5)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"no exit {grace + 5}s after SIGTERM") from None
        took = time.monotonic() - start
        assert code == 0, f"exit {code} after SIGTERM:\n{server.log.read_text()[-4000:]}"
        assert took < grace, f"exit took {took:.1f}s, more than the {grace}s grace period"
        return took


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[Servers]:
    spawned = Servers(tmp_path)
    yield spawned
    for server in spawned.spawned:  # a failed test may leave one running
        if server.proc.poll() is None:
            server.proc.kill()
            server.proc.wait()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of this test's own, to kill and restart."""
    server = RedisServer(tmp_path)
    yield server
    server.resume()
    server.kill()
