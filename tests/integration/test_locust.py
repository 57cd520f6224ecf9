"""A short headless locust run of loadtest/locustfile.py against a real `batchline serve`
subprocess, on loopback, bounded in time (a few seconds of load, one minute at most)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sysconfig
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from server._proto import inference_pb2 as pb
from server._proto import inference_pb2_grpc as pb_grpc
from tests.support.processes import ROOT, ServerProcess, serving

LOCUSTFILE = ROOT / "loadtest" / "locustfile.py"
RECORDER = ROOT / "tests" / "support" / "locust_record.py"
RUN_S = 4
USERS = 4
LIMIT_S = 60
Entry = dict[str, int]  # requests, failures, content_length
Failure = dict[str, Any]  # name, error, occurrences


@pytest.fixture(scope="module")
def server(
    demo_registry: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    with serving(
        demo_registry, tmp_path_factory.mktemp("locust"), "--model", "churn@production"
    ) as process:
        yield process


def locust_binary() -> str:
    local = Path(sysconfig.get_path("scripts")) / "locust"
    found = str(local) if local.exists() else shutil.which("locust")
    assert found, "locust is missing: install the dev extra"
    return found


def serves(address: str, model: str, version: str) -> bool:
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        try:
            reply = stub.ModelReady(pb.ModelReadyRequest(name=model, version=version), timeout=5)
        except grpc.RpcError:
            return False
    return bool(reply.ready)


def run_locust(address: str, out: Path, **settings: str) -> tuple[dict[str, Entry], list[Failure]]:
    """Run the locustfile headless; return its final stats entries by name and its errors.

    The record comes from tests/support/locust_record.py, written when locust quits, after every
    user has stopped: locust's --csv files are a snapshot rewritten once a second and only closed
    at the end, so they once listed 18 failures beside an Aggregated 0, and once none beside a
    summary (and an exit code) that had 7.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOCUST_")}
    env.update(settings)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    record_path = out / "record.json"
    env["BATCHLINE_LOCUST_RECORD"] = str(record_path)
    result = subprocess.run(
        [locust_binary(), "-f", f"{LOCUSTFILE},{RECORDER}", "--headless", "-u", str(USERS),
         "-r", str(USERS), "-t", f"{RUN_S}s", "--stop-timeout", "2", "--host", address,
         "--only-summary", "--loglevel", "WARNING"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=LIMIT_S, check=False,
    )  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode in (0, 1), output  # 1: some request failed (checked below)
    record = json.loads(record_path.read_text(encoding="utf-8"))
    assert record["exit_code"] == result.returncode, output
    failures: list[Failure] = record["errors"]
    # locust decides its exit code from the errors when it begins to stop, before the users'
    # last requests end; errors only grow after that, so exit 1 means some are recorded.
    if result.returncode == 1:
        assert failures, output
    return record["entries"], failures


def test_locust_inline_and_canary_scenarios_run_against_a_real_server(
    server: ServerProcess, tmp_path: Path
) -> None:
    stats, failures = run_locust(server.address, tmp_path)

    inline = stats["ModelInfer churn inline"]
    assert inline["requests"] > 0
    assert inline["failures"] == 0, failures
    assert inline["content_length"] > 0, "the response length is reported"

    primary = stats["ModelInfer churn v1 (primary)"]
    assert primary["requests"] > 0
    assert primary["failures"] == 0, failures

    # The canary share (version 2) succeeds once the server serves both versions of churn;
    # until canary routing lands it must fail exactly with "no served version" (NOT_FOUND).
    canary = stats.get("ModelInfer churn v2 (canary)")
    if canary is not None:
        canary_failures = [f for f in failures if f["name"] == "ModelInfer churn v2 (canary)"]
        if serves(server.address, "churn", "2"):
            assert canary["failures"] == 0, canary_failures
        else:
            assert canary_failures, "version 2 is not served, yet no canary call failed"
            assert all("NOT_FOUND" in f["error"] for f in canary_failures), canary_failures

    assert not any("entity" in name for name in stats), "the entity task runs only when enabled"


@pytest.mark.parametrize("binary", ["", "1"], ids=["json", "binary"])
def test_locust_http_user_runs_the_same_scenarios_over_rest(
    server: ServerProcess, tmp_path: Path, binary: str
) -> None:
    stats, failures = run_locust(
        f"http://127.0.0.1:{server.http_port}",
        tmp_path,
        LOCUST_PROTOCOL="http",
        LOCUST_HTTP_BINARY=binary,
    )
    inline = stats["infer churn inline"]
    assert inline["requests"] > 0
    assert inline["failures"] == 0, failures
    assert inline["content_length"] > 0
    primary = stats["infer churn v1 (primary)"]
    assert primary["failures"] == 0, failures
    # Only version 1 is served here: the canary share must fail as not found (404).
    canary_failures = [f for f in failures if f["name"] == "infer churn v2 (canary)"]
    assert all("404" in f["error"] for f in canary_failures), canary_failures
    assert "ModelInfer churn inline" not in stats, "the gRPC user stays off"
