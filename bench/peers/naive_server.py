"""The naive peer: a V2 gRPC server on batchline's stack that runs one ``session.run`` per request.

The same transport as ``bench.echo_server`` (grpc.aio on uvloop, the same server options), plus
what the simplest real server adds: decode the input tensor, run ONNX Runtime on the event loop
(one thread, no batching), encode the outputs as raw bytes. A serving framework has to beat this
to be worth its layers.

    python -m bench.peers.naive_server --model churn=path/to/model.onnx --port 0 --ready-file F

It answers ModelMetadata/ModelConfig the way batchline does (``max_batch_size`` 64, dims without
the batch dimension), so perf_analyzer drives it with the same arguments; it does not list the
``statistics`` extension. The ready file gets ``{"grpc_port": PORT, "pid": PID}``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnxruntime as ort
import uvloop

from bench.echo_server import SERVER_OPTIONS
from server._proto import inference_pb2 as pb
from server._proto import inference_pb2_grpc as pb_grpc
from server.readiness import write_ready_file

MAX_BATCH_SIZE = 64
_V2_TYPES = {"tensor(float)": "FP32", "tensor(int64)": "INT64", "tensor(double)": "FP64"}
_NUMPY_TYPES = {"FP32": np.float32, "INT64": np.int64, "FP64": np.float64}
_CONFIG_TYPES = {"FP32": pb.TYPE_FP32, "INT64": pb.TYPE_INT64, "FP64": pb.TYPE_FP64}


@dataclass(frozen=True)
class Tensor:
    name: str
    datatype: str
    shape: list[int]  # -1 for dynamic


@dataclass
class Model:
    name: str
    session: Any  # ort.InferenceSession
    inputs: list[Tensor]
    outputs: list[Tensor]


def load_model(name: str, path: Path) -> Model:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])

    def tensors(items: Any) -> list[Tensor]:
        return [
            Tensor(
                t.name,
                _V2_TYPES.get(t.type, "FP32"),
                [d if isinstance(d, int) else -1 for d in t.shape],
            )
            for t in items
        ]

    return Model(name, session, tensors(session.get_inputs()), tensors(session.get_outputs()))


class NaiveServicer(pb_grpc.GRPCInferenceServiceServicer):
    """One ONNX Runtime call per request, on the event loop; raw tensors in and out."""

    def __init__(self, models: dict[str, Model]) -> None:
        self._models = models
        self._output_names = {m.name: [t.name for t in m.outputs] for m in models.values()}

    async def _model(self, name: str, context: grpc.aio.ServicerContext) -> Model:
        model = self._models.get(name)
        if model is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"model {name!r} is not served")
        return model

    async def ServerLive(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return pb.ServerReadyResponse(ready=True)

    async def ModelReady(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return pb.ModelReadyResponse(ready=request.name in self._models)

    async def ServerMetadata(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return pb.ServerMetadataResponse(name="naive", version="0.1.0")

    async def ModelMetadata(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        m = await self._model(request.name, context)
        meta = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=m.name,
            versions=["1"],
            platform="onnxruntime_onnx",
            inputs=[meta(name=t.name, datatype=t.datatype, shape=t.shape) for t in m.inputs],
            outputs=[meta(name=t.name, datatype=t.datatype, shape=t.shape) for t in m.outputs],
        )

    async def ModelConfig(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        m = await self._model(request.name, context)
        return pb.ModelConfigResponse(
            config=pb.ModelConfig(
                name=m.name,
                platform="onnxruntime_onnx",
                max_batch_size=MAX_BATCH_SIZE,
                input=[
                    pb.ModelInput(
                        name=t.name, data_type=_CONFIG_TYPES[t.datatype], dims=t.shape[1:]
                    )
                    for t in m.inputs
                ],
                output=[
                    pb.ModelOutput(
                        name=t.name, data_type=_CONFIG_TYPES[t.datatype], dims=t.shape[1:]
                    )
                    for t in m.outputs
                ],
            )
        )

    def _infer(self, m: Model, request: Any) -> Any:
        feeds = {}
        for i, tensor in enumerate(request.inputs):
            dtype = _NUMPY_TYPES.get(tensor.datatype, np.float32)
            if i < len(request.raw_input_contents):
                flat = np.frombuffer(request.raw_input_contents[i], dtype=dtype)
            else:
                contents = tensor.contents
                flat = np.asarray(
                    contents.fp32_contents if dtype is np.float32 else contents.int64_contents,
                    dtype=dtype,
                )
            feeds[tensor.name] = flat.reshape(tuple(tensor.shape))
        results = m.session.run(self._output_names[m.name], feeds)
        response = pb.ModelInferResponse(model_name=m.name, model_version="1", id=request.id)
        for t, value in zip(m.outputs, results, strict=True):
            response.outputs.add(name=t.name, datatype=t.datatype, shape=value.shape)
            response.raw_output_contents.append(value.tobytes())
        return response

    async def ModelInfer(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        m = await self._model(request.model_name, context)
        try:
            return self._infer(m, request)
        except Exception as exc:  # bad shapes or types: the client's fault
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{type(exc).__name__}: {exc}")

    async def ModelStreamInfer(
        self, request_iterator: AsyncIterator[Any], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[Any]:
        async for request in request_iterator:
            m = self._models.get(request.model_name)
            if m is None:
                yield pb.ModelStreamInferResponse(
                    error_message=f"model {request.model_name!r} is not served"
                )
                continue
            try:
                yield pb.ModelStreamInferResponse(infer_response=self._infer(m, request))
            except Exception as exc:
                yield pb.ModelStreamInferResponse(error_message=f"{type(exc).__name__}: {exc}")


async def serve(models: dict[str, Model], host: str, port: int, ready_file: Path | None) -> None:
    server = grpc.aio.server(options=SERVER_OPTIONS)
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(NaiveServicer(models), server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise SystemExit(f"naive_server: could not bind {host}:{port}")
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if ready_file is not None:
        write_ready_file(ready_file, {"grpc_port": bound, "pid": os.getpid()})
    await stop.wait()
    await server.stop(5.0)


def parse_model(spec: str) -> tuple[str, Path]:
    name, sep, path = spec.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"--model: expected NAME=PATH, got {spec!r}")
    if not Path(path).is_file():
        raise argparse.ArgumentTypeError(f"--model {name}: no such file {path}")
    return name, Path(path)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.peers.naive_server", description=__doc__)
    parser.add_argument("--model", type=parse_model, action="append", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001, help="0 picks any free port")
    parser.add_argument("--ready-file", type=Path, help="where to write {grpc_port, pid}")
    args = parser.parse_args(argv)
    models = {name: load_model(name, path) for name, path in args.model}
    uvloop.run(serve(models, args.host, args.port, args.ready_file))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
