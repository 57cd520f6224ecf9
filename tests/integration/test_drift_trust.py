"""The drift sidecar trusts no one: a real sidecar process binds loopback by default, refuses
records, labels and refreshes without its token, and keeps its label memory bounded in bytes."""

from __future__ import annotations

import asyncio
import json
import socket
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest

from server._proto import drift_pb2 as pb
from server._proto import drift_pb2_grpc as pb_grpc
from server.drift import report as drift_report
from server.drift.producer import DriftProducer
from tests.integration.test_drift import drifted_rows
from tests.support.metrics import Samples
from tests.support.metrics import scrape as metrics_scrape
from tests.support.polling import eventually
from tests.support.processes import Sidecar, spawn_sidecar

TOKEN = "s3cret-drift-token"
WINDOW = (("model", "churn"), ("role", "primary"), ("version", "1"))


def listening_addresses(port: int) -> set[str]:
    """The local addresses of this host's TCP sockets listening on `port` (from /proc)."""
    found = set()
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        with open(table) as fh:
            next(fh)
            for line in fh:
                local, state = line.split()[1], line.split()[3]
                address, _, hex_port = local.partition(":")
                if state != "0A" or int(hex_port, 16) != port:  # 0A: LISTEN
                    continue
                raw = bytes.fromhex(address)
                # /proc prints each 32-bit word in host (little-endian) order.
                words = b"".join(raw[i : i + 4][::-1] for i in range(0, width // 2, 4))
                family = socket.AF_INET if width == 8 else socket.AF_INET6
                # gRPC binds an IPv6 socket for 127.0.0.1 too: its v4-mapped form says the same.
                found.add(socket.inet_ntop(family, words).removeprefix("::ffff:"))
    return found


def outbound_address() -> str | None:
    """This host's own non-loopback address, if it has one (a UDP connect sends nothing)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect(("192.0.2.1", 9))  # TEST-NET-1: routed, never answered
        except OSError:
            return None
        address = str(sock.getsockname()[0])
    return None if address.startswith("127.") or address == "0.0.0.0" else address


def http(sidecar: Sidecar, path: str, token: str | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(f"http://127.0.0.1:{sidecar.http_port}{path}")
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def scrape(sidecar: Sidecar) -> Samples:
    return metrics_scrape(sidecar.http_port)


def forged_batch(n: int) -> pb.PredictionBatch:
    """Records of a version the registry holds, with every feature far out of range."""
    batch = pb.PredictionBatch(producer="forger")
    for i in range(n):
        batch.records.add(
            model="churn", version="1", role=pb.ROLE_PRIMARY, request_id=f"forged-{i}",
            rows=1, n_features=15, features=[1e6] * 15, scores=[0.99],
        )  # fmt: skip
    return batch


async def stream(address: str, batch: pb.PredictionBatch, token: str | None) -> pb.RecordAck:
    metadata = (("authorization", f"Bearer {token}"),) if token is not None else None
    async with grpc.aio.insecure_channel(address) as channel:
        call = pb_grpc.DriftServiceStub(channel).Record(metadata=metadata)
        try:
            await call.write(batch)
            await call.done_writing()
        except grpc.aio.AioRpcError:
            # A write racing the sidecar's refusal can fail with gRPC's own INTERNAL; the
            # call's status is the sidecar's answer.
            pass
        ack: pb.RecordAck = await asyncio.wait_for(call, 10)
        return ack


async def test_sidecar_binds_loopback_by_default(
    demo_registry: Path, tmp_path: Path, sidecars: list[Sidecar]
) -> None:
    sidecar = spawn_sidecar(demo_registry, tmp_path, host=None)
    sidecars.append(sidecar)
    assert listening_addresses(sidecar.grpc_port) == {"127.0.0.1"}
    assert listening_addresses(sidecar.http_port) == {"127.0.0.1"}
    assert http(sidecar, "/healthz") == (200, b"ok\n")
    own = outbound_address()
    if own is not None:  # a host with a network: its own address does not reach the sidecar
        for port in (sidecar.grpc_port, sidecar.http_port):
            with (
                pytest.raises(ConnectionRefusedError),
                socket.create_connection((own, port), timeout=5),
            ):
                pass
    log = sidecar.log.read_text()
    assert "gRPC on 127.0.0.1:" in log
    assert "without a token" not in log  # loopback: nothing to warn about


async def test_http_on_every_address_is_said_and_refuses_refreshes_without_a_token(
    demo_registry: Path, tmp_path: Path, sidecars: list[Sidecar]
) -> None:
    sidecar = spawn_sidecar(demo_registry, tmp_path, 0, "--http-host", "0.0.0.0", host=None)
    sidecars.append(sidecar)
    assert listening_addresses(sidecar.grpc_port) == {"127.0.0.1"}
    assert listening_addresses(sidecar.http_port) == {"0.0.0.0"}
    log = sidecar.log.read_text()
    warnings = [json.loads(line) for line in log.splitlines() if "without a token" in line]
    assert [w["level"] for w in warnings] == ["warning"]
    assert "HTTP listens on 0.0.0.0" in warnings[0]["message"]
    # Reading stays open (a Prometheus scrape has no token); evaluating on demand does not.
    assert http(sidecar, "/metrics")[0] == 200
    assert http(sidecar, "/report.json")[0] == 200
    status, body = http(sidecar, "/report.json?refresh=1")
    assert status == 403
    assert b"BATCHLINE_DRIFT_TOKEN" in body


async def test_a_token_guards_records_labels_and_refreshes_and_the_producer_sends_it(
    demo_registry: Path, tmp_path: Path, sidecars: list[Sidecar]
) -> None:
    token_file = tmp_path / "drift-token"
    token_file.write_text(TOKEN + "\n")
    sidecar = spawn_sidecar(
        demo_registry, tmp_path, 0, "--token-file", str(token_file), "--http-host", "0.0.0.0"
    )
    sidecars.append(sidecar)
    assert "without a token" not in sidecar.log.read_text()

    # Forged records: no token, then a wrong one. Neither is counted, windowed or alerted on.
    for token in (None, "wrong-token"):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stream(sidecar.address, forged_batch(500), token)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    async with grpc.aio.insecure_channel(sidecar.address) as channel:
        stub = pb_grpc.DriftServiceStub(channel)
        labels = pb.LabelBatch(labels=[pb.Label(request_id="forged-0", labels=[1])])
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.PostLabels(labels, timeout=10)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.Report(pb.ReportRequest(refresh=True), timeout=10)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        last = await stub.Report(pb.ReportRequest(refresh=False), timeout=10)  # reading is open
    assert (last.records_total, last.alerts_fired_total, len(last.windows)) == (0, 0, 0)

    assert http(sidecar, "/report.json?refresh=1")[0] == 401
    assert http(sidecar, "/report.json?refresh=1", token="wrong-token")[0] == 401
    assert http(sidecar, "/report.json")[0] == 200
    assert http(sidecar, "/metrics")[0] == 200

    # The real producer with the token: accepted, counted, and a refresh with it works.
    X, proba, predicted, _ = drifted_rows(demo_registry)
    producer = DriftProducer(sidecar.address, chunk=100, token=TOKEN)
    await producer.start()
    for i in range(300):
        producer.record("churn", "1", "primary", f"r{i}", "", X[i], proba[i], predicted[i : i + 1])
    await eventually(lambda: producer.sent == 300, timeout=15, what="the producer's records sent")
    await producer.stop()
    assert producer.dropped_total() == 0
    status, body = await asyncio.to_thread(http, sidecar, "/report.json?refresh=1", TOKEN)
    assert status == 200
    assert json.loads(body)["records_total"] == 300
    report = await asyncio.to_thread(drift_report.fetch_report, sidecar.address, token=TOKEN)
    assert report.records_total == 300
    assert (await stream(sidecar.address, forged_batch(2), TOKEN)).received == 2

    metrics = scrape(sidecar)
    refused_total = {
        dict(labels)["method"]: value
        for (name, labels), value in metrics.items()
        if name == "batchline_drift_unauthenticated_total"
    }
    assert refused_total == {
        "Record": 2,
        "PostLabels": 1,
        "Report": 1,
        "HTTP /report.json?refresh": 2,
    }
    assert "refused" in sidecar.log.read_text()


async def test_a_producer_with_the_wrong_token_is_never_connected_and_says_why(
    demo_registry: Path, tmp_path: Path, sidecars: list[Sidecar], caplog: pytest.LogCaptureFixture
) -> None:
    sidecar = spawn_sidecar(demo_registry, tmp_path, env={"BATCHLINE_DRIFT_TOKEN": TOKEN})
    sidecars.append(sidecar)
    producer = DriftProducer(
        sidecar.address, token="not-the-token", warn_after_s=0.3, backoff_max_s=0.1
    )
    await producer.start()
    producer.record("churn", "1", "primary", "r0", "", np.zeros(15), np.array([0.5]))
    caplog.set_level("WARNING", logger="server.drift.producer")
    await eventually(
        lambda: any("unreachable" in r.getMessage() for r in caplog.records),
        timeout=15,
        what="the producer's unreachable warning",
    )
    assert not producer.connected
    assert producer.sent == 0
    message = next(r.getMessage() for r in caplog.records if "unreachable" in r.getMessage())
    assert "UNAUTHENTICATED" in message
    await producer.stop(flush_timeout_s=0.2)


async def test_label_memory_is_bounded_in_bytes_and_what_it_pushes_out_is_counted(
    demo_registry: Path, tmp_path: Path, sidecars: list[Sidecar]
) -> None:
    cap = 16 * 1024
    sidecar = spawn_sidecar(demo_registry, tmp_path, 0, "--label-memory-bytes", str(cap))
    sidecars.append(sidecar)
    X, proba, predicted, truth = drifted_rows(demo_registry)
    n = 200
    ids = [f"{i:04d}-" + "x" * 1000 for i in range(n)]  # long ids, under the 1 KiB id cap
    producer = DriftProducer(sidecar.address, chunk=50)
    await producer.start()
    for i in range(n):
        producer.record("churn", "1", "primary", ids[i], "", X[i], proba[i], predicted[i : i + 1])
    await eventually(lambda: producer.sent == n, timeout=15, what="all records sent")
    await producer.stop()

    async def ingested() -> bool:
        return bool(scrape(sidecar).get(("batchline_drift_records_total", WINDOW)) == n)

    await eventually(ingested, timeout=15, what="records ingested", every=0.05)
    metrics = scrape(sidecar)
    held = metrics["batchline_drift_pending_label_bytes", ()]
    rows = metrics["batchline_drift_pending_label_rows", ()]
    assert 0 < held <= cap
    assert held >= rows * 1000  # each remembered row brings its 1 KB id: bytes, not count
    evicted = metrics["batchline_drift_label_memory_evicted_total", (("bound", "bytes"),)]
    assert evicted == n - rows
    assert metrics["batchline_drift_label_memory_evicted_total", (("bound", "rows"),)] == 0

    kept = int(rows)

    def labels(part: range) -> pb.LabelBatch:
        return pb.LabelBatch(
            labels=[pb.Label(request_id=ids[i], labels=[int(truth[i])]) for i in part]
        )

    async with grpc.aio.insecure_channel(sidecar.address) as channel:
        stub = pb_grpc.DriftServiceStub(channel)
        newest = await stub.PostLabels(labels(range(n - kept, n)), timeout=10)
        oldest = await stub.PostLabels(labels(range(n - kept)), timeout=10)
    # The newest predictions are the ones still remembered; the oldest were pushed out.
    assert (newest.matched, newest.unknown) == (kept, 0)
    assert (oldest.matched, oldest.unknown) == (0, n - kept)
