"""Build and bind the grpc.aio server (inference service + grpc.health.v1)."""

from __future__ import annotations

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from server._proto import inference_pb2_grpc as pb_grpc
from server.api.servicer import InferenceServicer

SERVICE_NAME = "inference.GRPCInferenceService"


class Health:
    """The standard gRPC health service, SERVING only while the server is ready."""

    def __init__(self) -> None:
        self.servicer = health.aio.HealthServicer()

    async def set_serving(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", SERVICE_NAME):
            await self.servicer.set(name, status)


def build_server(
    servicer: InferenceServicer,
    health_service: Health,
    *,
    host: str,
    port: int,
    max_message_bytes: int,
    reuse_port: bool,
) -> tuple[grpc.aio.Server, int]:
    """Return the server and the port it really bound (port 0 picks a free one)."""
    server = grpc.aio.server(
        options=[
            ("grpc.so_reuseport", 1 if reuse_port else 0),
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
        ]
    )
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
    health_pb2_grpc.add_HealthServicer_to_server(health_service.servicer, server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"cannot bind gRPC port {host}:{port}")
    return server, bound
