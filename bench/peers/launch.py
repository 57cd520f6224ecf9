"""Start, watch and stop the servers `python -m bench.field` compares, each on the same ONNX files.

Every launcher returns a `Server`: the process (pid, gRPC port), how to read its model's
(rows, executions) counters for the mean batch size, and `stop()`. CPU time is read from
/proc/PID/stat for the whole process tree (Triton's python-backend stubs, MLServer workers).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from bench.processes import (
    LaunchError,
    fail,
    free_port,
    pinned,
    spawn,
    start_with_ready_file,
    stop,
    tree_cpu_seconds,
)

ROOT = Path(__file__).resolve().parents[2]
PEERS = ROOT / ".tools" / "peers"
TRITON_VENV = PEERS / "triton-venv"
MLSERVER_VENV = PEERS / "mlserver-venv"
HERE = Path(__file__).resolve().parent
INSTALL_HINT = "run scripts/install_peers.sh (make bench does)"

Counts = Callable[[str], "tuple[int, int] | None"]


@dataclass
class Server:
    name: str
    popen: subprocess.Popen[bytes]
    pid: int
    port: int
    log: Path
    counts: Counts = field(default=lambda _model: None)
    http_port: int = 0  # the V2 REST port, 0 when the server has none

    def cpu_seconds(self) -> float:
        return tree_cpu_seconds(self.pid)

    def stop(self) -> int:
        return stop(self.popen)


# ---- helpers ---------------------------------------------------------------------------------


def _popen(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    log.unlink(missing_ok=True)
    return spawn(cmd, log, env=env, new_session=True)


def _fail(name: str, popen: subprocess.Popen[bytes], log: Path, why: str) -> LaunchError:
    return fail(f"{name}:", popen, log, f"{why}; log {log}")


def model_statistics(port: int, model: str) -> tuple[int, int] | None:
    """(inference_count, execution_count) from the V2 ModelStatistics RPC (batchline, Triton)."""
    import grpc

    from server._proto import inference_pb2 as pb
    from server._proto import inference_pb2_grpc as pb_grpc

    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            reply = pb_grpc.GRPCInferenceServiceStub(channel).ModelStatistics(
                pb.ModelStatisticsRequest(name=model), timeout=10
            )
    except grpc.RpcError:
        return None
    rows = sum(s.inference_count for s in reply.model_stats)
    batches = sum(s.execution_count for s in reply.model_stats)
    return rows, batches


def wait_ready(name: str, popen: subprocess.Popen[bytes], log: Path, port: int,
               models: list[str], timeout_s: float = 180.0) -> None:  # fmt: skip
    """Poll ServerReady and ModelReady over gRPC until all `models` are ready."""
    import grpc

    from server._proto import inference_pb2 as pb
    from server._proto import inference_pb2_grpc as pb_grpc

    deadline = time.monotonic() + timeout_s
    while True:
        if popen.poll() is not None:
            raise _fail(name, popen, log, f"exited with {popen.returncode} before it was ready")
        try:
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = pb_grpc.GRPCInferenceServiceStub(channel)
                if stub.ServerReady(pb.ServerReadyRequest(), timeout=2).ready and all(
                    stub.ModelReady(pb.ModelReadyRequest(name=m), timeout=2).ready for m in models
                ):
                    return
        except grpc.RpcError:
            pass
        if time.monotonic() > deadline:
            raise _fail(name, popen, log, f"not ready after {timeout_s:.0f} s")
        time.sleep(0.2)


def _start_with_ready_file(name: str, cmd: list[str], work: Path) -> Server:
    log = work / f"{name}.log"
    log.unlink(missing_ok=True)
    popen, info = start_with_ready_file(
        name, cmd, work / f"{name}.ready.json", log, timeout_s=180, new_session=True
    )
    return Server(
        name, popen, int(info["pid"]), int(info["grpc_port"]), log,
        http_port=int(info.get("http_port") or 0),
    )  # fmt: skip


# ---- the servers -----------------------------------------------------------------------------


def start_echo(work: Path, cpus: str | None, transport: str = "grpcio") -> Server:
    name = "echo" if transport == "grpcio" else f"echo-{transport}"
    cmd = [sys.executable, "-m", "bench.echo_server", "--port", "0", "--transport", transport]
    return _start_with_ready_file(name, pinned(cmd, cpus), work)


def start_naive(work: Path, models: dict[str, Path], cpus: str | None) -> Server:
    cmd = [sys.executable, "-m", "bench.peers.naive_server", "--port", "0"]
    for name, path in models.items():
        cmd += ["--model", f"{name}={path}"]
    server = _start_with_ready_file("naive", pinned(cmd, cpus), work)
    server.counts = lambda _model: None  # one session.run per request: batch 1 by construction
    return server


def start_batchline(
    work: Path,
    registry: Path,
    models: list[str],
    batching: bool,
    cpus: str | None,
    transport: str | None = None,
) -> Server:
    """`batchline serve` with its defaults; `transport` overrides [server] grpc_transport."""
    name = "batchline" if batching else "batchline-nobatch"
    if transport is not None:
        name = f"batchline-{transport}"
    cmd = [
        sys.executable, "-m", "server.cli", "serve", "--registry", str(registry),
        "--host", "127.0.0.1", "--grpc-port", "0", "--http-port", "0", "--metrics-port", "0",
        "--log-level", "warning", *(a for m in models for a in ("--model", f"{m}@production")),
    ]  # fmt: skip
    if not batching:
        cmd.append("--no-batching")
    if transport is not None:
        cmd += ["--grpc-transport", transport]
    server = _start_with_ready_file(name, pinned(cmd, cpus), work)
    server.counts = lambda model: model_statistics(server.port, model)
    return server


TRITON_CONFIG = """\
name: "{name}"
backend: "python"
max_batch_size: {max_batch_size}
input [ {{ name: "input" data_type: TYPE_FP32 dims: [ {features} ] }} ]
output [
  {{ name: "label" data_type: TYPE_INT64 dims: [ 1 ] reshape: {{ shape: [ ] }} }},
  {{ name: "probabilities" data_type: TYPE_FP32 dims: [ 2 ] }}
]
dynamic_batching {{ max_queue_delay_microseconds: {delay_us} }}
instance_group [ {{ count: 1 kind: KIND_CPU }} ]
"""


def _site_packages(venv: Path) -> Path:
    found = sorted(venv.glob("lib/python3.*/site-packages"))
    if not found:
        raise LaunchError(f"{venv} is not a virtual environment; {INSTALL_HINT}")
    return found[0]


def start_triton(
    work: Path,
    models: dict[str, Path],
    cpus: str | None,
    max_batch_size: int = 64,
    delay_us: int = 500,
    features: int = 15,
) -> Server:
    """tritonserver 2.51 from nvidia-pytriton, one python-backend model per ONNX file."""
    site = _site_packages(TRITON_VENV)
    tritondir = site / "pytriton" / "tritonserver"
    binary = tritondir / "bin" / "tritonserver"
    stub = tritondir / "python_backend_stubs" / "3.11" / "triton_python_backend_stub"
    for path in (binary, stub):
        if not path.exists():
            raise LaunchError(f"triton: {path} is missing; {INSTALL_HINT}")
    root = work / "triton"
    shutil.rmtree(root, ignore_errors=True)
    backend = root / "backends" / "python"
    backend.mkdir(parents=True)
    for src in (
        tritondir / "backends" / "python" / "libtriton_python.so",
        tritondir / "backends" / "python" / "triton_python_backend_utils.py",
        stub,
    ):
        shutil.copy2(src, backend / src.name)
    repo = root / "models"
    for name, onnx in models.items():
        version = repo / name / "1"
        version.mkdir(parents=True)
        (repo / name / "config.pbtxt").write_text(
            TRITON_CONFIG.format(
                name=name, max_batch_size=max_batch_size, delay_us=delay_us, features=features
            )
        )
        shutil.copy2(HERE / "triton_model.py", version / "model.py")
        shutil.copy2(onnx, version / "model.onnx")
        (version / "sys_path.json").write_text(json.dumps([str(site)]))
    libpython = subprocess.run(
        [str(TRITON_VENV / "bin" / "python"), "-c",
         "import sysconfig; print(sysconfig.get_config_var('LIBDIR'))"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = ":".join(
        p for p in (str(site / "nvidia_pytriton.libs"), libpython, env.get("LD_LIBRARY_PATH")) if p
    )
    env.pop("PYTHONPATH", None)
    grpc_port, http_port = free_port(), free_port()
    cmd = [
        str(binary), "--model-repository", str(repo), "--backend-directory", str(root / "backends"),
        "--grpc-port", str(grpc_port), "--http-port", str(http_port),
        "--metrics-port", str(free_port()), "--log-verbose", "0",
        # Triton 2.51 segfaults (TRITONSERVER_InferenceRequestDelete) on ModelStreamInfer once
        # more requests are in flight than its gRPC state pool holds (default 8: c=16 worked,
        # c=32 crashed here); a pool above the highest concurrency measured avoids it.
        "--grpc-infer-allocation-pool-size", "256",
    ]  # fmt: skip
    log = work / "triton.log"
    popen = _popen(pinned(cmd, cpus), log, env)
    wait_ready("triton", popen, log, grpc_port, list(models))
    server = Server("triton", popen, popen.pid, grpc_port, log, http_port=http_port)
    server.counts = lambda model: model_statistics(grpc_port, model)
    return server


def model_config(name: str, max_batch_size: int, features: int, backend: str) -> bytes:
    """A serialized ModelConfigResponse for the demo models' signature (input [15] FP32;
    label INT64 and probabilities [2] FP32), batch dimension left out as Triton does."""
    from server._proto import inference_pb2 as pb

    config = pb.ModelConfig(
        name=name,
        backend=backend,
        max_batch_size=max_batch_size,
        input=[pb.ModelInput(name="input", data_type=pb.TYPE_FP32, dims=[features])],
        output=[
            pb.ModelOutput(name="label", data_type=pb.TYPE_INT64, dims=[]),
            pb.ModelOutput(name="probabilities", data_type=pb.TYPE_FP32, dims=[2]),
        ],
    )
    return bytes(pb.ModelConfigResponse(config=config).SerializeToString())


def start_mlserver(
    work: Path,
    models: dict[str, Path],
    cpus: str | None,
    max_batch_size: int = 32,
    max_batch_time_s: float = 0.005,
    features: int = 15,
) -> Server:
    """MLServer 1.7.1, parallel_workers 0 (inference in the server process), adaptive batching."""
    binary = MLSERVER_VENV / "bin" / "mlserver"
    if not binary.exists():
        raise LaunchError(f"mlserver: {binary} is missing; {INSTALL_HINT}")
    root = work / "mlserver"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    grpc_port = free_port()
    (root / "settings.json").write_text(
        json.dumps(
            {
                "debug": False,
                "host": "127.0.0.1",
                "http_port": free_port(),
                "grpc_port": grpc_port,
                "metrics_port": free_port(),
                "parallel_workers": 0,
                "load_models_at_startup": True,
            }
        )
    )
    stats: dict[str, Path] = {}
    for name, onnx in models.items():
        folder = root / name
        folder.mkdir()
        shutil.copy2(onnx, folder / "model.onnx")
        shutil.copy2(HERE / "mlserver_runtime.py", folder / "mlserver_runtime.py")
        stats[name] = folder / "stats.json"
        (folder / "model-settings.json").write_text(
            json.dumps(
                {
                    "name": name,
                    "implementation": "mlserver_runtime.OnnxRuntime",
                    "max_batch_size": max_batch_size,
                    "max_batch_time": max_batch_time_s,
                    "parameters": {
                        "uri": "./model.onnx",
                        "version": "1",
                        "extra": {"stats_file": str(stats[name])},
                    },
                    "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, features]}],
                    "outputs": [
                        {"name": "label", "datatype": "INT64", "shape": [-1]},
                        {"name": "probabilities", "datatype": "FP32", "shape": [-1, 2]},
                    ],
                },
                indent=2,
            )
        )
        (root / f"{name}.model_config.bin").write_bytes(
            model_config(name, max_batch_size, features, "mlserver")
        )
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    log = work / "mlserver.log"
    cmd = [str(MLSERVER_VENV / "bin" / "python"), str(HERE / "mlserver_main.py"), str(root)]
    popen = _popen(pinned(cmd, cpus), log, env)
    wait_ready("mlserver", popen, log, grpc_port, list(models))
    server = Server("mlserver", popen, popen.pid, grpc_port, log)

    def counts(model: str) -> tuple[int, int] | None:
        try:
            data = json.loads(stats[model].read_text())
        except (FileNotFoundError, json.JSONDecodeError, KeyError):
            return None
        return int(data["rows"]), int(data["calls"])

    server.counts = counts
    return server
