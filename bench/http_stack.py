"""Which HTTP server stack the V2 REST binding runs on, chosen by measurement.

Each candidate serves the same fixed-reply V2 REST endpoint on uvloop (server metadata, model
metadata and config, and an infer route that reads the whole body, parses the JSON header with
orjson, and answers one precomputed binary-tensor reply), so the difference between them is the
HTTP layer alone. perf_analyzer (-i http, sync mode, binary tensor data) drives each in turn.

    python -m bench.http_stack [--concurrency 64] [--seconds 4] [--stacks uvicorn-httptools,...]

Prints one line per stack (req/s, p50) and writes bench/results/http_stack.json. The machine is
small and shared: compare the stacks within one run, not across runs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson

from bench.processes import stop

ROOT = Path(__file__).resolve().parent.parent
PERF_ANALYZER = ROOT / ".tools" / "perf_analyzer" / "run"
STACKS = ("uvicorn-httptools", "uvicorn-h11", "aiohttp")

_METADATA = orjson.dumps(
    {
        "name": "echo",
        "versions": ["1"],
        "platform": "onnxruntime_onnx",
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 15]}],
        "outputs": [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 2]}],
    }
)
_CONFIG = orjson.dumps(
    {
        "name": "echo",
        "platform": "onnxruntime_onnx",
        "max_batch_size": 64,
        "input": [{"name": "input", "data_type": "TYPE_FP32", "dims": [15]}],
        "output": [{"name": "probabilities", "data_type": "TYPE_FP32", "dims": [2]}],
    }
)
_SERVER = orjson.dumps({"name": "echo", "version": "0", "extensions": ["binary_tensor_data"]})
_HEADER = orjson.dumps(
    {
        "model_name": "echo",
        "model_version": "1",
        "outputs": [
            {
                "name": "probabilities",
                "datatype": "FP32",
                "shape": [1, 2],
                "parameters": {"binary_data_size": 8},
            }
        ],
    }
)
_REPLY = _HEADER + b"\x00" * 8


def route(method: str, path: str, body: bytes, header_length: int | None) -> tuple[int, bytes]:
    """The fixed replies; the infer route parses the JSON header as the real one must."""
    if method == "POST" and path.endswith("/infer"):
        head = body[:header_length] if header_length is not None else body
        orjson.loads(head)
        return 200, _REPLY
    if path == "/v2":
        return 200, _SERVER
    if path.endswith("/config"):
        return 200, _CONFIG
    if path.startswith("/v2/health"):
        return 200, b""
    if path.startswith("/v2/models/"):
        return 200, _METADATA
    return 404, b'{"error":"not found"}'


def asgi_app() -> Callable[..., Awaitable[None]]:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        chunks = []
        while True:
            message = await receive()
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        header_length = None
        for name, value in scope["headers"]:
            if name == b"inference-header-content-length":
                header_length = int(value)
        status, body = route(scope["method"], scope["path"], b"".join(chunks), header_length)
        headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
        if body is _REPLY:
            headers.append((b"inference-header-content-length", b"%d" % len(_HEADER)))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    return app


async def serve_uvicorn(sock: socket.socket, http: str) -> None:
    import uvicorn

    config = uvicorn.Config(
        asgi_app(), http=http, lifespan="off", access_log=False, log_config=None
    )
    config.load()
    server = uvicorn.Server(config)
    server.lifespan = config.lifespan_class(config)
    await server.startup(sockets=[sock])
    await server.main_loop()


async def serve_aiohttp(sock: socket.socket) -> None:
    from aiohttp import web, web_protocol, web_server

    async def handler(request: web_protocol.BaseRequest) -> web.Response:
        body = await request.read()
        length = request.headers.get("Inference-Header-Content-Length")
        status, reply = route(
            request.method, request.path, body, int(length) if length is not None else None
        )
        headers = {"Content-Type": "application/json"}
        if reply is _REPLY:
            headers["Inference-Header-Content-Length"] = str(len(_HEADER))
        return web.Response(status=status, body=reply, headers=headers)

    server = web_server.Server(handler)  # the low-level server: no router, no middlewares
    loop = asyncio.get_running_loop()
    await loop.create_server(server, sock=sock)
    await asyncio.Event().wait()


def child(stack: str, port_file: str) -> None:
    import uvloop

    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(1024)
    Path(port_file).write_text(str(sock.getsockname()[1]))
    if stack == "aiohttp":
        uvloop.run(serve_aiohttp(sock))
    else:
        uvloop.run(serve_uvicorn(sock, stack.removeprefix("uvicorn-")))


def measure(stack: str, concurrency: int, seconds: float, workdir: Path) -> dict[str, Any]:
    port_file = workdir / f"{stack}.port"
    port_file.unlink(missing_ok=True)
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.http_stack", "--child", stack, "--port-file", str(port_file)],
        cwd=ROOT,
    )
    try:
        deadline = time.monotonic() + 30
        while not port_file.exists() or not port_file.read_text():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{stack} did not start")
            time.sleep(0.05)
        port = int(port_file.read_text())
        out = subprocess.run(
            [str(PERF_ANALYZER), "-m", "echo", "-u", f"127.0.0.1:{port}", "-i", "http",
             "--concurrency-range", str(concurrency), "--shape", "input:1,15",
             "--measurement-interval", str(int(seconds * 1000)), "--max-trials", "3",
             "--stability-percentage", "999"],
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        text = out.stdout + out.stderr
        rate = re.search(r"Throughput: ([\d.]+) infer/sec", text)
        p50 = re.search(r"p50 latency: (\d+) usec", text)
        if rate is None:
            raise RuntimeError(f"perf_analyzer against {stack} failed:\n{text[-2000:]}")
        return {
            "stack": stack,
            "req_per_s": float(rate.group(1)),
            "p50_us": int(p50.group(1)) if p50 else None,
        }
    finally:
        stop(proc, timeout_s=10)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--child", choices=STACKS, help=argparse.SUPPRESS)
    parser.add_argument("--port-file", help=argparse.SUPPRESS)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--stacks", default=",".join(STACKS))
    args = parser.parse_args()
    if args.child:
        child(args.child, args.port_file)
        return 0
    if not PERF_ANALYZER.exists():
        print("perf_analyzer missing: run scripts/install_perf_analyzer.sh", file=sys.stderr)
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="http-stack-"))
    results = []
    for stack in args.stacks.split(","):
        row = measure(stack, args.concurrency, args.seconds, workdir)
        print(f"{stack:20s} {row['req_per_s']:8.0f} req/s   p50 {row['p50_us']} us", flush=True)
        results.append(row)
    load = os.getloadavg()
    (ROOT / "bench" / "results" / "http_stack.json").write_text(
        json.dumps({"concurrency": args.concurrency, "loadavg": load, "results": results}, indent=2)
        + "\n"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
