"""--workers N: processes share the gRPC port; the parent's metrics endpoint merges theirs."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np

from server._proto import inference_pb2_grpc as pb_grpc
from tests.support.metrics import scrape
from tests.support.polling import eventually_blocking
from tests.support.processes import ROOT, free_ports
from tests.support.requests import infer_request


def test_two_workers_share_the_port_and_their_metrics_add_up(
    demo_registry: Path, tmp_path: Path
) -> None:
    proc, grpc_port, worker_ports, metrics_port = _start_workers(demo_registry, tmp_path)
    try:
        request = infer_request(np.zeros((1, 15), np.float32), "churn")
        sent = 0
        for n in range(20):  # separate connections, spread by SO_REUSEPORT
            options = [("grpc.use_local_subchannel_pool", 1), ("test.conn", n)]
            with grpc.insecure_channel(f"127.0.0.1:{grpc_port}", options=options) as channel:
                stub = pb_grpc.GRPCInferenceServiceStub(channel)
                for _ in range(10):
                    stub.ModelInfer(request, timeout=10)
                    sent += 1
        ok = (("model", "churn"), ("protocol", "grpc"), ("status", "OK"), ("version", "1"))
        merged = scrape(metrics_port)
        per_worker = [scrape(p).get(("batchline_requests_total", ok), 0.0) for p in worker_ports]
        assert merged[("batchline_requests_total", ok)] == sent == sum(per_worker)
        assert all(count > 0 for count in per_worker), per_worker  # both workers served
        info = [k for k in merged if k[0] == "batchline_model_info"]
        assert [merged[k] for k in info] == [1.0]  # state, not a sum
        assert (
            merged[
                (
                    "batchline_request_duration_seconds_count",
                    (("model", "churn"), ("protocol", "grpc"), ("version", "1")),
                )
            ]
            == sent
        )
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0


def _start_workers(
    registry: Path, tmp_path: Path, *extra: str
) -> tuple[subprocess.Popen[bytes], int, list[int]]:
    (grpc_port,) = free_ports(1)
    (http_port,) = free_ports(1)
    metrics_port, *worker_ports = free_ports(3)
    ready = tmp_path / "ready.json"
    proc = subprocess.Popen(
        [sys.executable, "-m", "server.cli", "serve", "--registry", str(registry),
         "--model", "churn@production", "--host", "127.0.0.1", "--grpc-port", str(grpc_port),
         "--http-port", str(http_port),
         "--metrics-port", str(metrics_port), "--workers", "2", "--ready-file", str(ready),
         *extra],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
    )  # fmt: skip

    def workers_ready() -> bool:
        assert proc.poll() is None, "the server exited"
        return all(Path(f"{ready}.{i}").exists() for i in range(2))

    eventually_blocking(workers_ready, timeout=90, what="both workers ready", every=0.05)
    return proc, grpc_port, worker_ports, metrics_port


def _fresh_answers(grpc_port: int, calls: int) -> list[tuple[str, str, str]]:
    """(route canary, status version, inference version) seen on `calls` new connections."""
    from server._proto import admin_pb2 as admin_pb
    from server._proto import admin_pb2_grpc as admin_grpc

    request = infer_request(np.zeros((1, 15), np.float32), "churn")
    seen = []
    for n in range(calls):
        options = [("grpc.use_local_subchannel_pool", 1), ("test.conn", n)]
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}", options=options) as channel:
            admin = admin_grpc.AdminServiceStub(channel)
            route = admin.GetRoute(admin_pb.GetRouteRequest(model="churn"), timeout=10)
            status = admin.ModelStatus(admin_pb.ModelStatusRequest(model="churn"), timeout=10)
            reply = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=10)
            seen.append((route.canary, status.models[0].version, reply.model_version))
    return seen


def test_set_route_and_reload_reach_every_worker_before_the_answer(
    demo_registry: Path, tmp_path: Path
) -> None:
    """One admin call, one state: every fresh connection (spread over both workers by
    SO_REUSEPORT) sees the route and the reloaded version as soon as the call has answered."""
    from server._proto import admin_pb2 as admin_pb
    from server._proto import admin_pb2_grpc as admin_grpc

    proc, grpc_port, worker_ports, _ = _start_workers(demo_registry, tmp_path)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            admin = admin_grpc.AdminServiceStub(channel)
            admin.SetRoute(
                admin_pb.RouteSpec(model="churn", canary="2", canary_percent=100.0), timeout=60
            )
        assert set(_fresh_answers(grpc_port, 16)) == {("2", "1", "2")}

        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            admin = admin_grpc.AdminServiceStub(channel)
            admin.SetRoute(admin_pb.RouteSpec(model="churn"), timeout=60)
            reply = admin.ReloadModel(
                admin_pb.ReloadModelRequest(model="churn", ref="churn@2"), timeout=60
            )
            assert (reply.version, reply.changed) == ("2", True)
        assert set(_fresh_answers(grpc_port, 16)) == {("", "2", "2")}

        ok_v2 = (("model", "churn"), ("protocol", "grpc"), ("status", "OK"), ("version", "2"))
        per_worker = [scrape(p).get(("batchline_requests_total", ok_v2), 0.0) for p in worker_ports]
        assert all(count > 0 for count in per_worker), per_worker  # both workers answered
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
