"""``python -m loadtest`` against ``bench.echo_server``, both real processes on loopback."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from loadtest.payload import infer_request_for_model
from server._proto import inference_pb2 as pb
from server._proto import inference_pb2_grpc as pb_grpc
from tests.support.processes import ROOT, free_port, spawn_echo

UNARY = "inference.GRPCInferenceService/ModelInfer"
STREAM = "inference.GRPCInferenceService/ModelStreamInfer"
CLI_TIMEOUT_S = 90


@pytest.fixture(scope="module")
def echo_port(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """An echo server on a free port; stopped with SIGTERM, and it must exit 0."""
    with spawn_echo(tmp_path_factory.mktemp("echo")) as port:
        yield port


def _loadtest(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "loadtest", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT_S,
        check=False,
    )


def _report(*args: str) -> dict[str, Any]:
    done = _loadtest(*args, "-O", "json")
    assert done.returncode == 0, done.stderr
    report: dict[str, Any] = json.loads(done.stdout)
    return report


def _assert_all_ok(report: dict[str, Any], count: int) -> None:
    assert report["count"] == count
    assert report["statusCodeDistribution"] == {"OK": count}
    assert report["errorDistribution"] == {}
    assert report["rps"] > 0
    dist = {p["percentage"]: p["latency"] for p in report["latencyDistribution"]}
    assert 0 < report["fastest"] <= dist[50] <= dist[99] <= report["slowest"]
    assert report["fastest"] <= report["average"] <= report["slowest"]
    assert sum(b["count"] for b in report["histogram"]) == count
    assert report["clientCpuSeconds"] > 0


@pytest.mark.parametrize("call", [UNARY, STREAM])
def test_cli_completes_every_call_ok(echo_port: int, call: str) -> None:
    report = _report(f"127.0.0.1:{echo_port}", "--insecure", "--call", call, "-n", "500", "-c", "8")
    _assert_all_ok(report, 500)
    assert report["call"] == call
    assert (report["concurrency"], report["procs"]) == (8, 1)


@pytest.mark.parametrize("call", [UNARY, STREAM])
def test_cli_builds_the_request_from_model_metadata(echo_port: int, call: str) -> None:
    report = _report(
        f"127.0.0.1:{echo_port}",
        "--call",
        call,
        "--model",
        "echo",
        "--rows",
        "4",
        "-n",
        "500",
        "-c",
        "8",
    )
    _assert_all_ok(report, 500)


def test_model_request_has_rows_times_features_of_fp32(echo_port: int) -> None:
    """The request --model echo --rows 4 sends: shape [4, 15], 240 raw bytes, an id."""
    with grpc.insecure_channel(f"127.0.0.1:{echo_port}") as channel:
        metadata = pb_grpc.GRPCInferenceServiceStub(channel).ModelMetadata(
            pb.ModelMetadataRequest(name="echo"), timeout=10
        )
    request = infer_request_for_model(metadata, rows=4)
    assert request.model_name == "echo"
    assert request.id
    assert [(i.name, i.datatype, list(i.shape)) for i in request.inputs] == [
        ("input", "FP32", [4, 15])
    ]
    values = np.frombuffer(request.raw_input_contents[0], dtype=np.float32)
    assert values.shape == (60,)

    typed = infer_request_for_model(metadata, rows=4, typed=True)
    assert len(typed.inputs[0].contents.fp32_contents) == 60
    assert not typed.raw_input_contents


@pytest.mark.parametrize("call", [UNARY, STREAM])
def test_procs_merge_into_one_report_with_the_full_count(echo_port: int, call: str) -> None:
    report = _report(
        f"127.0.0.1:{echo_port}", "--call", call, "-n", "500", "-c", "8", "--procs", "2"
    )
    _assert_all_ok(report, 500)
    assert report["procs"] == 2


def test_skip_first_leaves_warm_up_calls_out_of_the_count(echo_port: int) -> None:
    report = _report(f"127.0.0.1:{echo_port}", "-n", "300", "-c", "4", "--skipFirst", "100")
    _assert_all_ok(report, 200)


def test_duration_run_stops_by_itself(echo_port: int) -> None:
    started = time.monotonic()
    report = _report(f"127.0.0.1:{echo_port}", "-z", "300ms", "-c", "4")
    assert report["count"] > 0
    assert report["statusCodeDistribution"] == {"OK": report["count"]}
    assert 0.3e9 <= report["total"] < 5e9
    assert time.monotonic() - started < CLI_TIMEOUT_S


def test_rate_limit_caps_requests_per_second(echo_port: int) -> None:
    report = _report(f"127.0.0.1:{echo_port}", "-n", "100", "-c", "4", "--rps", "200")
    assert report["count"] == 100
    assert report["rps"] < 240  # 100 calls at 200/s take ~0.5 s


@pytest.mark.parametrize("call", [UNARY, STREAM])
def test_unreachable_server_counts_unavailable_instead_of_hanging(call: str) -> None:
    port = free_port()
    report = _report(
        f"127.0.0.1:{port}",
        "--call",
        call,
        "-n",
        "20",
        "-c",
        "2",
        "-t",
        "2s",
        "--connect-timeout",
        "1s",
    )
    assert report["count"] == 20
    assert report["statusCodeDistribution"] == {"UNAVAILABLE": 20}
    assert report["latencyDistribution"] == []
    assert all(message.startswith("UNAVAILABLE") for message in report["errorDistribution"])


def test_summary_format_prints_a_human_table(echo_port: int) -> None:
    done = _loadtest(f"127.0.0.1:{echo_port}", "-n", "50", "-c", "2")
    assert done.returncode == 0, done.stderr
    for heading in ("Summary:", "Requests/sec:", "Latency distribution:", "[OK]\t50 responses"):
        assert heading in done.stdout


def test_bad_duration_is_a_usage_error_naming_the_flag() -> None:
    done = _loadtest("127.0.0.1:1", "-z", "10x")
    assert done.returncode == 2
    assert "-z/--duration" in done.stderr


def test_unknown_method_is_an_error_naming_the_flag() -> None:
    done = _loadtest("127.0.0.1:1", "--call", "inference.GRPCInferenceService/Nope")
    assert done.returncode == 1
    assert "--call" in done.stderr


class _EveryOtherFails(pb_grpc.GRPCInferenceServiceServicer):
    """Odd-numbered calls (per stream, for streaming) succeed; even ones fail or never answer."""

    def __init__(self, hang: bool) -> None:
        self.hang = hang
        self.calls = 0

    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInferResponse:
        self.calls += 1
        if self.calls % 2 == 0:
            if self.hang:
                await asyncio.Event().wait()
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full")
        return pb.ModelInferResponse(id=request.id)

    async def ModelStreamInfer(
        self,
        request_iterator: AsyncIterator[pb.ModelInferRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        n = 0
        async for request in request_iterator:
            n += 1
            if n % 2 == 0:
                if self.hang:
                    await asyncio.Event().wait()
                yield pb.ModelStreamInferResponse(error_message="queue full")
            else:
                yield pb.ModelStreamInferResponse(
                    infer_response=pb.ModelInferResponse(id=request.id)
                )


@pytest.fixture
async def start_failing_server() -> AsyncIterator[Callable[[bool], Awaitable[int]]]:
    servers: list[grpc.aio.Server] = []

    async def start(hang: bool) -> int:
        server = grpc.aio.server()
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(_EveryOtherFails(hang), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        servers.append(server)
        return port

    yield start
    for server in servers:
        await server.stop(None)


async def _async_report(*args: str) -> dict[str, Any]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "loadtest",
        *args,
        "-O",
        "json",
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(CLI_TIMEOUT_S):
        out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    report: dict[str, Any] = json.loads(out)
    return report


@pytest.mark.parametrize(
    ("call", "codes", "errors"),
    [
        (UNARY, {"OK": 50, "RESOURCE_EXHAUSTED": 50}, {"RESOURCE_EXHAUSTED: queue full": 50}),
        (STREAM, {"OK": 50, "STREAM_ERROR": 50}, {"queue full": 50}),
    ],
)
async def test_failures_are_counted_by_status_and_message(
    start_failing_server: Callable[[bool], Awaitable[int]],
    call: str,
    codes: dict[str, int],
    errors: dict[str, int],
) -> None:
    port = await start_failing_server(False)
    report = await _async_report(f"127.0.0.1:{port}", "--call", call, "-n", "100", "-c", "1")
    assert report["count"] == 100
    assert report["statusCodeDistribution"] == codes
    assert report["errorDistribution"] == errors
    assert sum(b["count"] for b in report["histogram"]) == 50


@pytest.mark.parametrize("call", [UNARY, STREAM])
async def test_unanswered_calls_end_at_the_timeout_as_deadline_exceeded(
    start_failing_server: Callable[[bool], Awaitable[int]], call: str
) -> None:
    port = await start_failing_server(True)
    report = await _async_report(
        f"127.0.0.1:{port}", "--call", call, "-n", "4", "-c", "1", "-t", "300ms"
    )
    assert report["statusCodeDistribution"] == {"OK": 2, "DEADLINE_EXCEEDED": 2}


# ---- ghz's --proto / --protoset and the short --call ---------------------------------------


def test_short_call_names_the_method_alone(echo_port: int) -> None:
    report = _report(f"127.0.0.1:{echo_port}", "--call", "ModelInfer", "-n", "200", "-c", "4")
    _assert_all_ok(report, 200)
    assert report["call"] == UNARY


def test_proto_file_resolves_the_call_like_ghz(echo_port: int) -> None:
    report = _report(
        f"127.0.0.1:{echo_port}",
        "--proto",
        str(ROOT / "proto" / "inference.proto"),
        "--call",
        "inference.GRPCInferenceService.ModelInfer",
        "--model",
        "echo",
        "-n",
        "200",
        "-c",
        "4",
    )
    _assert_all_ok(report, 200)


def test_protoset_with_json_data_and_a_short_call(echo_port: int, tmp_path: Path) -> None:
    from grpc_tools import protoc

    protoset = tmp_path / "inference.protoset"
    assert (
        protoc.main(
            [
                "protoc",
                f"-I{ROOT / 'proto'}",
                "--include_imports",
                f"--descriptor_set_out={protoset}",
                "inference.proto",
            ]
        )
        == 0
    )
    data = json.dumps(
        {
            "model_name": "echo",
            "inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 15]}],
            "raw_input_contents": ["AAAAAA=="],
        }
    )
    report = _report(
        f"127.0.0.1:{echo_port}", "--protoset", str(protoset), "--call", "ModelInfer",
        "-d", data, "-n", "200", "-c", "4",
    )  # fmt: skip
    _assert_all_ok(report, 200)


def test_bad_proto_flags_are_named(tmp_path: Path) -> None:
    garbage = tmp_path / "x.protoset"
    garbage.write_bytes(b"\xff\xff not a descriptor set")
    cases = [
        (("--protoset", str(garbage)), "--protoset: not a FileDescriptorSet"),
        (("--proto", str(tmp_path / "missing.proto")), "--proto:"),
        (("--call", "NoSuchMethod"), "has no method 'NoSuchMethod'"),
        (
            ("--proto", str(ROOT / "proto" / "inference.proto"), "--protoset", str(garbage)),
            "give --proto or --protoset, not both",
        ),
    ]
    for flags, message in cases:
        done = _loadtest("127.0.0.1:1", *flags, "-n", "1", "-c", "1")
        assert done.returncode != 0, flags
        assert message in done.stderr, (flags, done.stderr)
