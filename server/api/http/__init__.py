"""The Open Inference Protocol's HTTP/REST binding (KServe V2 REST, Triton's binary tensor data
extension): `RestApp` (the ASGI app) served by `RestServer` (uvicorn + httptools on the
process's event loop, beside grpc.aio)."""

from server.api.http.app import STATUS, RestApp
from server.api.http.server import RestServer

__all__ = ["STATUS", "RestApp", "RestServer"]
