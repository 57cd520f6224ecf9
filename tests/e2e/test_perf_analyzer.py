"""Triton's own load generator, perf_analyzer, as an acceptance client against `batchline serve`.

perf_analyzer reads ModelMetadata, ModelConfig and ServerMetadata, then drives ModelInfer (sync,
--async with replies matched by id, or bidirectional ModelStreamInfer) and, because batchline
lists the `statistics` extension, reads ModelStatistics around every measurement window and
checks them (e.g. compute_input/infer/output counts must agree). Each run is short: 500 ms
windows, and a stability threshold so loose that three windows always suffice.
"""

from __future__ import annotations

import csv
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from server._proto import inference_pb2 as pb
from server._proto import inference_pb2_grpc as pb_grpc
from tests.support.polling import settled
from tests.support.processes import ServerProcess

WINDOW_MS = 500
RUN_TIMEOUT_S = 45


@dataclass(frozen=True)
class Counts:
    success: int
    fail: int
    inferences: int  # rows
    executions: int  # batches

    def __sub__(self, other: Counts) -> Counts:
        return Counts(
            self.success - other.success,
            self.fail - other.fail,
            self.inferences - other.inferences,
            self.executions - other.executions,
        )


@dataclass(frozen=True)
class PerfResult:
    output: str
    rows: list[dict[str, str]]  # the -f CSV, one row per concurrency level

    def throughput(self) -> dict[int, float]:
        return {int(r["Concurrency"]): float(r["Inferences/Second"]) for r in self.rows}

    def client_requests(self) -> int:
        """Requests perf_analyzer measured (summed over levels; warm-up requests excluded)."""
        return sum(int(n) for n in re.findall(r"^\s*Request count: (\d+)", self.output, re.M))

    def server_successes(self) -> list[int]:
        """Per level, the successes perf_analyzer read from our ModelStatistics."""
        return [int(n) for n in re.findall(r"Successful request count: (\d+)", self.output)]


def model_counts(server: ServerProcess, model: str) -> Counts:
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        reply = stub.ModelStatistics(pb.ModelStatisticsRequest(name=model), timeout=10)
    (st,) = reply.model_stats
    return Counts(
        st.inference_stats.success.count,
        st.inference_stats.fail.count,
        st.inference_count,
        st.execution_count,
    )


def settled_counts(server: ServerProcess, model: str, timeout: float = 5.0) -> Counts:
    """The model's counts once two reads 50 ms apart agree (requests still in the server after
    the client exits would otherwise race the read)."""
    return settled(lambda: model_counts(server, model), timeout=timeout, every=0.05)


def run_perf_analyzer(
    perf_analyzer: Path,
    server: ServerProcess,
    tmp_path: Path,
    model: str,
    *args: str,
    protocol: str = "grpc",
) -> PerfResult:
    report = tmp_path / f"{model}.csv"
    url = server.address if protocol == "grpc" else f"127.0.0.1:{server.http_port}"
    cmd = [
        str(perf_analyzer),
        "-i", protocol,
        "-u", url,
        "-m", model,
        "--measurement-interval", str(WINDOW_MS),
        "--stability-percentage", "1000",
        "--max-trials", "5",
        "-f", str(report),
        *args,
    ]  # fmt: skip
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=RUN_TIMEOUT_S, check=False, cwd=tmp_path
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(cmd)}\nexit {proc.returncode}:\n{output}"
    assert "error" not in output.lower(), output
    with open(report, newline="") as f:
        rows = list(csv.DictReader(f))
    return PerfResult(output, rows)


def check_run(result: PerfResult, delta: Counts, levels: set[int], rows_per_request: int) -> None:
    throughput = result.throughput()
    assert set(throughput) == levels, result.output
    assert all(t > 0 for t in throughput.values()), result.output
    # perf_analyzer used our statistics: one non-empty server section per level.
    successes = result.server_successes()
    assert len(successes) == len(levels), result.output
    assert all(n > 0 for n in successes), result.output
    # ... and the server counted every request it measured (plus warm-up and between-window
    # requests), each with `rows_per_request` rows, and none failed.
    assert delta.fail == 0
    assert delta.success >= result.client_requests() > 0
    assert delta.inferences == rows_per_request * delta.success
    assert 0 < delta.executions <= delta.success


@pytest.mark.parametrize(
    "mode",
    [
        pytest.param((), id="sync"),
        pytest.param(("--async",), id="async"),
    ],
)
def test_churn_concurrency_1_and_4(
    perf_analyzer: Path, batchline_server: ServerProcess, tmp_path: Path, mode: tuple[str, ...]
) -> None:
    before = model_counts(batchline_server, "churn")
    result = run_perf_analyzer(
        perf_analyzer, batchline_server, tmp_path, "churn", "--concurrency-range", "1:4:3", *mode
    )
    check_run(result, settled_counts(batchline_server, "churn") - before, {1, 4}, 1)


def test_churn_streaming(
    perf_analyzer: Path, batchline_server: ServerProcess, tmp_path: Path
) -> None:
    before = model_counts(batchline_server, "churn")
    result = run_perf_analyzer(
        perf_analyzer,
        batchline_server,
        tmp_path,
        "churn",
        "--concurrency-range",
        "4",
        "--streaming",
    )
    check_run(result, settled_counts(batchline_server, "churn") - before, {4}, 1)


@pytest.mark.parametrize(
    "mode",
    [
        pytest.param((), id="sync"),
        pytest.param(("--async",), id="async"),
    ],
)
def test_churn_mlp_batch_of_4_rows(
    perf_analyzer: Path, batchline_server: ServerProcess, tmp_path: Path, mode: tuple[str, ...]
) -> None:
    before = model_counts(batchline_server, "churn_mlp")
    result = run_perf_analyzer(
        perf_analyzer,
        batchline_server,
        tmp_path,
        "churn_mlp",
        "-b", "4",
        "--concurrency-range", "2",
        *mode,
    )  # fmt: skip
    assert "Batch size: 4" in result.output
    check_run(result, settled_counts(batchline_server, "churn_mlp") - before, {2}, 4)


@pytest.mark.parametrize(
    "tensor_format",
    [
        pytest.param(("--input-tensor-format", "binary", "--output-tensor-format", "binary"),
                     id="binary"),
        pytest.param(("--input-tensor-format", "json", "--output-tensor-format", "json"),
                     id="json"),
    ],
)  # fmt: skip
def test_churn_over_http(
    perf_analyzer: Path,
    batchline_server: ServerProcess,
    tmp_path: Path,
    tensor_format: tuple[str, ...],
) -> None:
    """perf_analyzer -i http, sync (its --async HTTP mode fails on HTTP/1.1 servers): the REST binding's
    metadata, config and statistics JSON satisfy it, and every request it sent was counted."""
    before = model_counts(batchline_server, "churn")
    result = run_perf_analyzer(
        perf_analyzer, batchline_server, tmp_path, "churn", "--concurrency-range", "1:4:3",
        *tensor_format, protocol="http",
    )  # fmt: skip
    check_run(result, settled_counts(batchline_server, "churn") - before, {1, 4}, 1)
