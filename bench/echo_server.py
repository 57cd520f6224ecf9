"""The RPC ceiling: a V2 gRPC server on batchline's stack that answers without inference.

It runs the same transport as the real server (grpc.aio on uvloop, ``grpc.so_reuseport``, 64 MiB
messages, the generated servicer registration; ``--transport native``: batchline's own HTTP/2
transport, server/api/h2, with the same servicer) and answers ``ModelInfer`` / ``ModelStreamInfer``
for any model name with one precomputed response, so whatever req/s it reaches is the most any
Python server on this stack can reach on the same machine.

    python -m bench.echo_server --port 0 --ready-file /tmp/echo.json

Once it listens it writes ``{"grpc_port": PORT, "pid": PID}`` to the ready file atomically; it
exits 0 on SIGTERM or SIGINT after a graceful ``server.stop``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import uvloop

from server._proto import inference_pb2 as pb
from server._proto import inference_pb2_grpc as pb_grpc
from server.api.h2.server import NativeServer
from server.readiness import write_ready_file

MODEL_NAME = "echo"
MODEL_VERSION = "1"
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
SERVER_OPTIONS = (
    ("grpc.so_reuseport", 1),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
)

_Tensor = pb.ModelMetadataResponse.TensorMetadata
_Output = pb.ModelInferResponse.InferOutputTensor


def _metadata(name: str) -> pb.ModelMetadataResponse:
    return pb.ModelMetadataResponse(
        name=name,
        versions=[MODEL_VERSION],
        platform="onnxruntime_onnx",
        inputs=[_Tensor(name="input", datatype="FP32", shape=[-1, 15])],
        outputs=[
            _Tensor(name="label", datatype="INT64", shape=[-1]),
            _Tensor(name="probabilities", datatype="FP32", shape=[-1, 2]),
        ],
    )


def _config(name: str) -> pb.ModelConfigResponse:
    return pb.ModelConfigResponse(
        config=pb.ModelConfig(
            name=name,
            platform="onnxruntime_onnx",
            max_batch_size=0,
            input=[pb.ModelInput(name="input", data_type=pb.TYPE_FP32, dims=[-1, 15])],
            output=[
                pb.ModelOutput(name="label", data_type=pb.TYPE_INT64, dims=[-1]),
                pb.ModelOutput(name="probabilities", data_type=pb.TYPE_FP32, dims=[-1, 2]),
            ],
        )
    )


def _fixed_response() -> pb.ModelInferResponse:
    """One row's worth of outputs, as the churn model would answer."""
    return pb.ModelInferResponse(
        model_name=MODEL_NAME,
        model_version=MODEL_VERSION,
        outputs=[
            _Output(name="label", datatype="INT64", shape=[1]),
            _Output(name="probabilities", datatype="FP32", shape=[1, 2]),
        ],
        raw_output_contents=[
            np.array([1], dtype=np.int64).tobytes(),
            np.array([[0.25, 0.75]], dtype=np.float32).tobytes(),
        ],
    )


class EchoServicer(pb_grpc.GRPCInferenceServiceServicer):
    """Answers every inference with the same outputs, echoing only the request id.

    Metadata and config describe the single model ``echo`` under whatever name is asked for, so
    a client pointed at another model name (perf_analyzer ``-m churn``) still gets a usable answer.
    """

    def __init__(self) -> None:
        self._template = _fixed_response()

    def _reply(self, request_id: str) -> pb.ModelInferResponse:
        # CopyFrom + one field costs ~0.6 us on this machine (constructing afresh: ~2 us); a
        # shared, mutated template would be cheaper still but relies on grpc serialising before
        # the next handler runs.
        response = pb.ModelInferResponse()
        response.CopyFrom(self._template)
        response.id = request_id
        return response

    async def ServerLive(
        self, request: pb.ServerLiveRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(
        self, request: pb.ServerReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=True)

    async def ModelReady(
        self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelReadyResponse:
        return pb.ModelReadyResponse(ready=True)

    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name="echo", version="0.1.0")

    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelMetadataResponse:
        return _metadata(request.name or MODEL_NAME)

    async def ModelConfig(
        self, request: pb.ModelConfigRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelConfigResponse:
        return _config(request.name or MODEL_NAME)

    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInferResponse:
        return self._reply(request.id)

    async def ModelStreamInfer(
        self,
        request_iterator: AsyncIterator[pb.ModelInferRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        async for request in request_iterator:
            yield pb.ModelStreamInferResponse(infer_response=self._reply(request.id))


async def serve(
    host: str, port: int, ready_file: Path | None, grace_s: float, transport: str = "grpcio"
) -> None:
    server: Any
    if transport == "native":
        server = NativeServer(max_message_bytes=MAX_MESSAGE_BYTES)
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(EchoServicer(), server)
        bound = server.add_port(host, port, reuse_port=True)
    else:
        server = grpc.aio.server(options=SERVER_OPTIONS)
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(EchoServicer(), server)
        bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise SystemExit(f"echo_server: could not bind {host}:{port}")
    await server.start()

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if ready_file is not None:
        write_ready_file(ready_file, {"grpc_port": bound, "pid": os.getpid()})
    await stop.wait()
    await server.stop(grace_s)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.echo_server", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001, help="0 picks any free port")
    parser.add_argument("--ready-file", type=Path, help="where to write {grpc_port, pid}")
    parser.add_argument("--grace", type=float, default=5.0, help="seconds to finish calls on stop")
    parser.add_argument(
        "--transport",
        choices=("grpcio", "native"),
        default="grpcio",
        help="grpc.aio, or batchline's native HTTP/2 transport (server/api/h2)",
    )
    args = parser.parse_args(argv)
    uvloop.run(serve(args.host, args.port, args.ready_file, args.grace, args.transport))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
