"""A short headless locust run of loadtest/locustfile.py against a real `batchline serve`
subprocess, on loopback, bounded in time (a few seconds of load, one minute at most)."""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sysconfig
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from server._proto import inference_pb2 as pb
from server._proto import inference_pb2_grpc as pb_grpc
from tests.support.processes import ROOT, ServerProcess, serving

LOCUSTFILE = ROOT / "loadtest" / "locustfile.py"
RUN_S = 4
USERS = 4
LIMIT_S = 60


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


def run_locust(
    address: str, out: Path, **settings: str
) -> tuple[dict[str, dict[str, str]], list[dict[str, str]]]:
    """Run the locustfile headless; return its stats rows by name and its failure rows."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOCUST_")}
    env.update(settings)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    prefix = out / "run"
    result = subprocess.run(
        [locust_binary(), "-f", str(LOCUSTFILE), "--headless", "-u", str(USERS), "-r", str(USERS),
         "-t", f"{RUN_S}s", "--stop-timeout", "2", "--host", address, "--only-summary",
         "--csv", str(prefix), "--loglevel", "WARNING"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=LIMIT_S, check=False,
    )  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode in (0, 1), output  # 1: some request failed (checked below)
    with open(f"{prefix}_stats.csv", newline="") as fh:
        stats = {row["Name"]: row for row in csv.DictReader(fh)}
    with open(f"{prefix}_failures.csv", newline="") as fh:
        failures = list(csv.DictReader(fh))
    # Exit 1 exactly when some request failed. The failures file is the record: the stats
    # file's Aggregated row once read 0 failures beside 18 listed ones (a loaded machine,
    # requests failing during the stop), which is locust's bookkeeping, not the server's.
    assert (result.returncode == 0) == (not failures), output
    return stats, failures


def test_locust_inline_and_canary_scenarios_run_against_a_real_server(
    server: ServerProcess, tmp_path: Path
) -> None:
    stats, failures = run_locust(server.address, tmp_path)

    inline = stats["ModelInfer churn inline"]
    assert int(inline["Request Count"]) > 0
    assert int(inline["Failure Count"]) == 0, failures
    assert float(inline["Average Content Size"]) > 0, "the response length is reported"

    primary = stats["ModelInfer churn v1 (primary)"]
    assert int(primary["Request Count"]) > 0
    assert int(primary["Failure Count"]) == 0, failures

    # The canary share (version 2) succeeds once the server serves both versions of churn;
    # until canary routing lands it must fail exactly with "no served version" (NOT_FOUND).
    canary = stats.get("ModelInfer churn v2 (canary)")
    if canary is not None:
        canary_failures = [f for f in failures if f["Name"] == "ModelInfer churn v2 (canary)"]
        if serves(server.address, "churn", "2"):
            assert int(canary["Failure Count"]) == 0, canary_failures
        else:
            assert canary_failures, "version 2 is not served, yet no canary call failed"
            assert all("NOT_FOUND" in f["Error"] for f in canary_failures), canary_failures

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
    assert int(inline["Request Count"]) > 0
    assert int(inline["Failure Count"]) == 0, failures
    assert float(inline["Average Content Size"]) > 0
    primary = stats["infer churn v1 (primary)"]
    assert int(primary["Failure Count"]) == 0, failures
    # Only version 1 is served here: the canary share must fail as not found (404).
    canary_failures = [f for f in failures if f["Name"] == "infer churn v2 (canary)"]
    assert all("404" in f["Error"] for f in canary_failures), canary_failures
    assert "ModelInfer churn inline" not in stats, "the gRPC user stays off"
