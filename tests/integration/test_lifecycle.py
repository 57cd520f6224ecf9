"""The server process's life: graceful drain on SIGTERM under load, SIGINT, start-up errors that
name what is wrong, and `batchline health`. Real `batchline serve` subprocesses throughout."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import wait as wait_all
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from registry_client.demo import load_holdout
from server._proto import inference_pb2 as pb
from server._proto import inference_pb2_grpc as pb_grpc
from tests.support.metrics import metric, scrape
from tests.support.polling import eventually_blocking
from tests.support.processes import ROOT, ServerProcess, spawn_server
from tests.support.requests import infer_request

GRACE_S = 10.0
CALL_TIMEOUT = 30.0


def batchline(*args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "server.cli", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.fixture
def served(demo_registry: Path, tmp_path: Path) -> Iterator[list[ServerProcess]]:
    """Servers a test spawns; any still running at the end are stopped (and killed if stuck)."""
    servers: list[ServerProcess] = []
    yield servers
    for server in servers:
        if server.proc.poll() is None:
            server.terminate(timeout=GRACE_S + 5)


def wait_unready(stub: pb_grpc.GRPCInferenceServiceStub, until: float) -> bool:
    """Poll ServerReady until it says false or the server is gone (True), or `until` passes."""
    while time.monotonic() < until:
        try:
            ready = stub.ServerReady(pb.ServerReadyRequest(), timeout=1.0).ready
        except grpc.RpcError as exc:
            return exc.code() == grpc.StatusCode.UNAVAILABLE
        if not ready:
            return True
        time.sleep(0.01)  # poll interval of a bounded condition loop
    return False


def queued_rows(server: ServerProcess, model: str) -> float:
    samples = scrape(server.metrics_port, timeout_s=CALL_TIMEOUT)
    return metric(samples, "batchline_queue_rows", model=model)


def wait_for_queued_rows(server: ServerProcess, model: str, rows: int) -> None:
    eventually_blocking(
        lambda: queued_rows(server, model) == rows,
        timeout=CALL_TIMEOUT,
        what=f"{model} having {rows} rows queued",
        every=0.01,
    )


@dataclass
class Outcome:
    code: grpc.StatusCode
    details: str
    started: float
    finished: float  # time.monotonic()


# ---- graceful drain -------------------------------------------------------------------------


def test_sigterm_under_load_answers_every_call_ok_or_unavailable_and_exits_0(
    demo_registry: Path, tmp_path: Path, served: list[ServerProcess]
) -> None:
    """200 calls at concurrency 32 on churn_mlp; SIGTERM once 80 have been answered. Every call
    ends OK or UNAVAILABLE (never CANCELLED or anything else) within its deadline, readiness goes
    false (or the server goes away), and the process exits 0 within the grace period."""
    server = spawn_server(
        demo_registry, tmp_path, "--grace-period", str(GRACE_S),
        "--model", "churn_mlp@production", "--execution", "executor",
    )  # fmt: skip
    served.append(server)
    X = load_holdout(demo_registry, "churn_mlp", "1").X
    answered = 0
    lock = threading.Lock()
    midway = threading.Event()

    def call(stub: pb_grpc.GRPCInferenceServiceStub, i: int) -> Outcome:
        nonlocal answered
        rows = X[(5 * i) % 1000 : (5 * i) % 1000 + 1 + i % 4]
        started = time.monotonic()
        try:
            reply = stub.ModelInfer(
                infer_request(rows, "churn_mlp", id=str(i)), timeout=CALL_TIMEOUT
            )
            outcome = Outcome(grpc.StatusCode.OK, "", started, time.monotonic())
            assert reply.id == str(i)
            assert list(reply.outputs[1].shape) == [len(rows), 2]
        except grpc.RpcError as exc:
            outcome = Outcome(exc.code(), exc.details() or "", started, time.monotonic())
        with lock:
            answered += 1
            if answered == 80:
                midway.set()
        return outcome

    with grpc.insecure_channel(server.address) as channel, ThreadPoolExecutor(32) as pool:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        futures = [pool.submit(call, stub, i) for i in range(200)]
        assert midway.wait(timeout=60), "80 calls were not answered in time"
        server.proc.send_signal(signal.SIGTERM)
        sigterm_at = time.monotonic()
        went_unready = wait_unready(stub, until=sigterm_at + GRACE_S)
        _, hung = wait_all(futures, timeout=CALL_TIMEOUT + 5)

    exit_code = server.proc.wait(timeout=GRACE_S + 5)
    exited_after = time.monotonic() - sigterm_at
    log = server.log.read_text()
    assert not hung, f"{len(hung)} calls never finished"
    outcomes = [f.result() for f in futures]
    wrong = [
        f"{o.code.name} ({o.details}) for a call sent {sigterm_at - o.started:+.3f}s before SIGTERM"
        for o in sorted(outcomes, key=lambda o: o.started)
        if o.code not in (grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE)
    ]
    assert not wrong, f"{len(wrong)} calls failed otherwise than UNAVAILABLE: {wrong[:5]}"
    assert all(o.code == grpc.StatusCode.OK for o in outcomes if o.finished < sigterm_at)
    assert "unanswered" not in log, log
    assert went_unready
    assert exit_code == 0, log
    assert exited_after < GRACE_S


def test_sigterm_lets_queued_requests_finish_while_refusing_new_ones(
    demo_registry: Path, tmp_path: Path, served: list[ServerProcess]
) -> None:
    """16 requests wait in churn's queue (it holds a batch up to 4 s for a preferred size of
    256 rows); SIGTERM arrives while they wait. During the drain ServerReady is false, health is
    NOT_SERVING and a new call gets UNAVAILABLE; the 16 then finish OK and the process exits 0."""
    config = tmp_path / "batchline.toml"
    config.write_text(
        "[model_defaults]\nmax_batch_size = 256\npreferred_batch_sizes = [256]\n"
        "max_queue_delay_us = 4000000\n"
    )
    server = spawn_server(
        demo_registry, tmp_path, "--config", str(config), "--grace-period", str(GRACE_S),
        "--model", "churn@production",
    )  # fmt: skip
    served.append(server)
    X = load_holdout(demo_registry, "churn", "1").X

    with grpc.insecure_channel(server.address) as channel, ThreadPoolExecutor(16) as pool:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        futures = [
            pool.submit(
                stub.ModelInfer,
                infer_request(X[i : i + 1], model="churn", id=str(i)),
                timeout=CALL_TIMEOUT,
            )
            for i in range(16)
        ]
        wait_for_queued_rows(server, "churn", 16)
        server.proc.send_signal(signal.SIGTERM)
        sigterm_at = time.monotonic()

        assert wait_unready(stub, until=sigterm_at + GRACE_S)
        health = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=CALL_TIMEOUT
        )
        with pytest.raises(grpc.RpcError) as refused:
            stub.ModelInfer(infer_request(X[:1], model="churn"), timeout=CALL_TIMEOUT)
        still_queued = not any(f.done() for f in futures)
        replies = [f.result(timeout=CALL_TIMEOUT) for f in futures]

    assert health.status == health_pb2.HealthCheckResponse.NOT_SERVING
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert still_queued, "the queued requests finished before the drain was observed"
    assert [r.id for r in replies] == [str(i) for i in range(16)]
    assert all(list(r.outputs[0].shape) == [1] for r in replies)
    assert server.proc.wait(timeout=GRACE_S + 5) == 0, server.log.read_text()
    assert time.monotonic() - sigterm_at < GRACE_S


def test_sigint_drains_and_exits_0(
    demo_registry: Path, tmp_path: Path, served: list[ServerProcess]
) -> None:
    server = spawn_server(
        demo_registry, tmp_path, "--grace-period", str(GRACE_S), "--model", "churn@production"
    )
    served.append(server)
    X = load_holdout(demo_registry, "churn", "1").X
    with grpc.insecure_channel(server.address) as channel:
        reply = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
            infer_request(X[:3], model="churn"), timeout=CALL_TIMEOUT
        )
    assert list(reply.outputs[0].shape) == [3]

    server.proc.send_signal(signal.SIGINT)

    assert server.proc.wait(timeout=GRACE_S + 5) == 0, server.log.read_text()
    assert "signal received" in server.log.read_text()


# ---- start-up errors ------------------------------------------------------------------------


def test_serve_with_an_unknown_config_key_exits_non_zero_naming_the_key(
    demo_registry: Path, tmp_path: Path
) -> None:
    config = tmp_path / "batchline.toml"
    config.write_text("[server]\nmax_mesage_bytes = 4096\n")

    result = batchline(
        "serve", "--config", str(config), "--registry", str(demo_registry),
        "--model", "churn@production", "--grpc-port", "0", "--metrics-port", "-1",
    )  # fmt: skip

    assert result.returncode != 0
    assert "server.max_mesage_bytes" in result.stderr


def test_serve_with_a_missing_model_alias_exits_non_zero_naming_it(demo_registry: Path) -> None:
    result = batchline(
        "serve", "--registry", str(demo_registry), "--model", "churn@staging",
        "--grpc-port", "0", "--metrics-port", "-1",
    )  # fmt: skip

    assert result.returncode != 0
    assert "staging" in result.stderr


# ---- batchline health -----------------------------------------------------------------------


def test_health_command_exits_0_against_a_serving_server(server_process: ServerProcess) -> None:
    result = batchline("health", "--address", server_process.address)

    assert result.returncode == 0, result.stderr
    assert "SERVING" in result.stdout


def test_health_command_exits_1_against_a_closed_port() -> None:
    with socket.socket() as sock:  # a port that was free a moment ago and has no listener
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]

    result = batchline("health", "--address", f"127.0.0.1:{port}", "--timeout", "2")

    assert result.returncode == 1
    assert "UNAVAILABLE" in result.stderr
