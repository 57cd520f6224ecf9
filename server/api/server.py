"""Build and bind the grpc.aio server (inference service + grpc.health.v1)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import descriptor_pool  # type: ignore[import-untyped]
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2

from server._proto import admin_pb2
from server._proto import inference_pb2 as pb
from server.api.acceptor import CallAcceptor
from server.api.admin import AdminGuard, AdminServicer
from server.api.h2.server import NativeServer, tls_context
from server.api.servicer import InferenceServicer

SERVICE_NAME = "inference.GRPCInferenceService"
ADMIN_SERVICE_NAME = "batchline.admin.v1.AdminService"
# The inference service's methods that change what is served: the admin guard applies to them
# exactly as to every AdminService method.
ADMIN_METHODS = frozenset({"RepositoryModelLoad", "RepositoryModelUnload"})
# The inference methods the CallAcceptor takes (more than grpc.aio's one outstanding request
# for a new call) and runs itself, with less per call and per message than grpc.aio's handler
# path (server/api/acceptor.py).
HOT_METHODS = ("ModelInfer", "ModelStreamInfer")
# gRPC server reflection (grpcurl, ghz and Postman without --proto): grpcio-reflection serves
# v1alpha; v1 has the same messages field for field, so the same servicer answers it too
# (grpcurl asks v1 first).
REFLECTION_SERVICES = (reflection.SERVICE_NAME, "grpc.reflection.v1.ServerReflection")


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


@dataclass(frozen=True)
class TlsFiles:
    """PEM files for TLS on the gRPC port; with a CA, clients must present a certificate it
    signed (mutual TLS)."""

    cert: str
    key: str
    ca: str = ""

    def server_credentials(self) -> grpc.ServerCredentials:
        ca = Path(self.ca).read_bytes() if self.ca else None
        return grpc.ssl_server_credentials(
            [(Path(self.key).read_bytes(), Path(self.cert).read_bytes())],
            root_certificates=ca,
            require_client_auth=ca is not None,
        )


def _serialize(message: Any) -> bytes:
    # The raw inference path hands back bytes it encoded itself (server/api/wire.py).
    return message if message.__class__ is bytes else message.SerializeToString()


def guarded(behaviour: Any, guard: AdminGuard) -> Any:
    """`behaviour` behind the admin guard: the one place admin auth is applied, when the
    handlers are built (a server interceptor would run for every ModelInfer too)."""

    async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await guard.check(context)
        return await behaviour(request, context)

    return call


def method_handlers(
    servicer: Any,
    *,
    module: Any = pb,
    service_name: str = "GRPCInferenceService",
    guard: AdminGuard | None = None,
    admin_methods: frozenset[str] | None = ADMIN_METHODS,
) -> dict[str, grpc.RpcMethodHandler]:
    """One handler per RPC of a service in proto/ (inference by default), bound to
    `servicer`; the `admin_methods` (None: all of them) go through `guard`."""
    handlers = {}
    service = module.DESCRIPTOR.services_by_name[service_name]
    for method in service.methods:
        request_type = getattr(module, method.input_type.name)
        behaviour = getattr(servicer, method.name)
        if guard is not None and (admin_methods is None or method.name in admin_methods):
            behaviour = guarded(behaviour, guard)
        if method.client_streaming and method.server_streaming:
            make = grpc.stream_stream_rpc_method_handler
        elif method.client_streaming or method.server_streaming:
            raise NotImplementedError(
                f"{method.name}: only unary and bidirectional RPCs are served"
            )
        else:
            make = grpc.unary_unary_rpc_method_handler
        handlers[method.name] = make(behaviour, request_type.FromString, _serialize)
    return handlers


def _reflection_pool(files: tuple[Any, ...]) -> descriptor_pool.DescriptorPool:
    """One pool holding `files` and their imports: batchline's generated modules live in a
    private pool (server/_proto/_pool.py), grpc's health and reflection in the default one."""
    pool = descriptor_pool.DescriptorPool()
    added: set[str] = set()

    def add(file: Any) -> None:
        if file.name in added:
            return
        for dependency in file.dependencies:
            add(dependency)
        pool.AddSerializedFile(file.serialized_pb)
        added.add(file.name)

    for file in files:
        add(file)
    return pool


def add_reflection(server: Any, service_names: tuple[str, ...]) -> None:
    """Serve reflection for `service_names` under both reflection service names."""
    pool = _reflection_pool(
        (pb.DESCRIPTOR, admin_pb2.DESCRIPTOR, health_pb2.DESCRIPTOR, reflection_pb2.DESCRIPTOR)
    )
    servicer = reflection.aio.ReflectionServicer(
        (*service_names, reflection.SERVICE_NAME), pool=pool
    )
    handler = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        tuple(
            grpc.method_handlers_generic_handler(name, {"ServerReflectionInfo": handler})
            for name in REFLECTION_SERVICES
        )
    )


class GrpcServer:
    """A grpc.aio server and its CallAcceptor, started and stopped together; everything else
    is the grpc.aio server's."""

    def __init__(self, server: grpc.aio.Server, acceptor: CallAcceptor | None) -> None:
        self.server = server
        self.acceptor = acceptor

    async def start(self) -> None:
        await self.server.start()
        if self.acceptor is not None:
            self.acceptor.start()

    async def stop(self, grace: float | None) -> None:
        await self.server.stop(grace)
        if self.acceptor is not None:
            await self.acceptor.stop()

    def calls_in_flight(self) -> int:
        """Hot-method calls accepted and not finished (those grpc.aio's own accept loop took
        are not counted: with the acceptor on, core hands it nearly every call)."""
        return 0 if self.acceptor is None else self.acceptor.in_flight

    def rest_contention(self) -> Callable[[], bool] | None:
        """What REST's turn budget asks: whether gRPC calls are in flight (grpc.aio's take
        several loop turns each, server/api/http/fairness.py)."""
        return lambda: self.calls_in_flight() > 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.server, name)


def register(
    server: Any,
    servicer: InferenceServicer,
    health_service: Health,
    admin: AdminServicer | None,
    guard: AdminGuard | None,
) -> dict[str, grpc.RpcMethodHandler]:
    """Every service on `server` (grpc.aio's or the native one: both take grpc's handlers):
    inference, health, admin (when given), reflection. Returns the inference handlers."""
    handlers = method_handlers(servicer, guard=guard)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)
    health_pb2_grpc.add_HealthServicer_to_server(health_service.servicer, server)
    if admin is not None:
        admin_handlers = method_handlers(
            admin,
            module=admin_pb2,
            service_name="AdminService",
            guard=guard,
            admin_methods=None,
        )
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(ADMIN_SERVICE_NAME, admin_handlers),)
        )
        server.add_registered_method_handlers(ADMIN_SERVICE_NAME, admin_handlers)
    add_reflection(
        server,
        (SERVICE_NAME, health.SERVICE_NAME, *((ADMIN_SERVICE_NAME,) if admin is not None else ())),
    )
    return handlers


def build_server(
    servicer: InferenceServicer,
    health_service: Health,
    *,
    host: str,
    port: int,
    max_message_bytes: int,
    reuse_port: bool,
    admin: AdminServicer | None = None,
    guard: AdminGuard | None = None,
    tls: TlsFiles | None = None,
    max_connection_age_s: float = 0.0,
    max_connection_age_grace_s: float = 30.0,
    max_concurrent_rpcs: int = 0,
    max_pending_rpcs: int = 0,
    transport: str = "grpcio",
) -> tuple[GrpcServer | NativeServer, int]:
    """Return the server and the port it really bound (port 0 picks a free one).

    `transport` "native" serves the same handlers on server/api/h2 (HTTP/2 on the event loop);
    "grpcio" on grpc.aio, where, unless `max_concurrent_rpcs` is set (grpc.aio counts that
    limit in its own accept loop), the hot methods get a CallAcceptor, so gRPC keeps its share
    of the loop beside HTTP."""
    if transport == "native":
        native = NativeServer(
            max_message_bytes=max_message_bytes,
            max_concurrent_rpcs=max_concurrent_rpcs,
            max_connection_age_s=max_connection_age_s,
            max_connection_age_grace_s=max_connection_age_grace_s,
        )
        register(native, servicer, health_service, admin, guard)
        context = None if tls is None else tls_context(tls.cert, tls.key, tls.ca)
        try:
            bound = native.add_port(host, port, reuse_port=reuse_port, tls=context)
        except OSError as exc:
            raise OSError(f"cannot bind gRPC port {host}:{port}: {exc.strerror}") from exc
        return native, bound
    server = grpc.aio.server(
        maximum_concurrent_rpcs=max_concurrent_rpcs or None,
        options=[
            ("grpc.so_reuseport", 1 if reuse_port else 0),
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
        ]
        + (
            [
                # gRPC core refuses calls beyond these before Python (it answers CANCELLED).
                ("grpc.server.max_pending_requests", max_pending_rpcs),
                ("grpc.server.max_pending_requests_hard_limit", 2 * max_pending_rpcs),
            ]
            if max_pending_rpcs > 0
            else []
        )
        + (
            [
                ("grpc.max_connection_age_ms", int(max_connection_age_s * 1000)),
                ("grpc.max_connection_age_grace_ms", int(max_connection_age_grace_s * 1000)),
            ]
            if max_connection_age_s > 0
            else []
        ),
    )
    handlers = register(server, servicer, health_service, admin, guard)
    address = f"{host}:{port}"
    if tls is None:
        bound = server.add_insecure_port(address)
    else:
        bound = server.add_secure_port(address, tls.server_credentials())
    if bound == 0:
        raise OSError(f"cannot bind gRPC port {host}:{port}")
    acceptor = None
    if not max_concurrent_rpcs:
        acceptor = CallAcceptor(
            server, {f"/{SERVICE_NAME}/{name}": handlers[name] for name in HOT_METHODS}
        )
    return GrpcServer(server, acceptor), bound
