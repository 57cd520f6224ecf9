"""`mlserver start FOLDER`, plus the one RPC perf_analyzer needs that MLServer 1.7.1 lacks.

perf_analyzer reads ModelConfig once, before it sends any inference; MLServer's gRPC service has
no ModelConfig method, so perf_analyzer stops at "failed to get model config: Method not found".
This entry point adds a generic handler for ``/inference.GRPCInferenceService/ModelConfig`` to
MLServer's own grpc.aio server, answering with the bytes of a ModelConfigResponse that
bench/field.py wrote to ``FOLDER/NAME.model_config.bin``. Everything else, the inference path
included, is stock MLServer. Runs inside MLServer's venv:

    .tools/peers/mlserver-venv/bin/python bench/peers/mlserver_main.py FOLDER
"""

from __future__ import annotations

import sys
from pathlib import Path

import grpc
from mlserver.cli.main import main
from mlserver.grpc.server import GRPCServer

METHOD = "/inference.GRPCInferenceService/ModelConfig"


def _requested_name(request: bytes) -> str:
    """Field 1 (name) of a ModelConfigRequest, decoded by hand (no generated code here)."""
    i = 0
    while i < len(request):
        tag, i = _varint(request, i)
        wire = tag & 7
        if wire == 2:
            size, i = _varint(request, i)
            if tag >> 3 == 1:
                return request[i : i + size].decode()
            i += size
        elif wire == 0:
            _, i = _varint(request, i)
        else:
            break
    return ""


def _varint(data: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[i]
        i += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, i
        shift += 7


class ModelConfigHandler(grpc.GenericRpcHandler):
    def __init__(self, replies: dict[str, bytes]) -> None:
        self._replies = replies

    def service(
        self, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        if handler_call_details.method != METHOD:
            return None

        async def model_config(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            name = _requested_name(request)
            if name not in self._replies:
                await context.abort(grpc.StatusCode.NOT_FOUND, f"no config for model {name!r}")
            return self._replies[name]

        return grpc.unary_unary_rpc_method_handler(model_config)


def run(folder: Path) -> None:
    replies = {
        p.name.removesuffix(".model_config.bin"): p.read_bytes()
        for p in folder.glob("*.model_config.bin")
    }
    original = GRPCServer._create_server

    def create_server(self: GRPCServer) -> grpc.aio.Server:
        server = original(self)
        server.add_generic_rpc_handlers((ModelConfigHandler(replies),))
        return server

    GRPCServer._create_server = create_server
    sys.argv = ["mlserver", "start", str(folder)]
    main()


if __name__ == "__main__":
    run(Path(sys.argv[1]))
