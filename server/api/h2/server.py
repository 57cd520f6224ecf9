"""The native gRPC server: a listening socket on the event loop, one `Connection` per client,
the same method handlers grpc.aio would run (server/api/server.py registers them here exactly
as there), and grpc.aio's `start` / `stop(grace)` life cycle."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple

import grpc

from server.api.h2.connection import Connection
from server.net import listening_socket

log = logging.getLogger(__name__)


class _CallDetails(NamedTuple):
    """What a generic handler is asked with (grpc.HandlerCallDetails' fields)."""

    method: str
    invocation_metadata: tuple[tuple[str, Any], ...]


class NativeServer:
    """gRPC over HTTP/2 served by this process's event loop alone (no gRPC core)."""

    def __init__(
        self,
        *,
        max_message_bytes: int,
        max_concurrent_rpcs: int = 0,
        max_connection_age_s: float = 0.0,
        max_connection_age_grace_s: float = 30.0,
    ) -> None:
        self.max_receive = max_message_bytes
        self.max_send = max_message_bytes
        self.max_calls = max_concurrent_rpcs
        self.max_connection_age_s = max_connection_age_s
        self.max_connection_age_grace_s = max_connection_age_grace_s
        self.calls = 0  # calls admitted and not ended (max_concurrent_rpcs counts these)
        self.connections: set[Connection] = set()
        self.accepted = 0  # connections accepted since start
        self._registered: dict[bytes, grpc.RpcMethodHandler] = {}
        self._generic: list[Any] = []
        self._socket: socket.socket | None = None
        self._ssl: ssl.SSLContext | None = None
        self._listener: asyncio.Server | None = None
        self._closed: asyncio.Event | None = None
        self.loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]  # set by start

    # ---- what it serves (grpc.aio.Server's registration methods) ---------------------------

    def add_generic_rpc_handlers(self, handlers: Iterable[Any]) -> None:
        self._generic.extend(handlers)

    def add_registered_method_handlers(
        self, service: str, handlers: Mapping[str, grpc.RpcMethodHandler]
    ) -> None:
        for name, handler in handlers.items():
            self._registered[f"/{service}/{name}".encode("ascii")] = handler

    def lookup(self, path: bytes) -> grpc.RpcMethodHandler | None:
        handler = self._registered.get(path)
        if handler is not None or not self._generic:
            return handler
        try:
            method = path.decode("ascii")
        except UnicodeDecodeError:
            return None
        details = _CallDetails(method, ())
        for generic in self._generic:
            found = generic.service(details)
            if found is not None:
                self._registered[path] = found  # a known method: found the same way next time
                return found
        return None

    # ---- where it listens ------------------------------------------------------------------

    def add_port(
        self, host: str, port: int, *, reuse_port: bool, tls: ssl.SSLContext | None = None
    ) -> int:
        """Bind now (so the port is known before start, as with grpc.aio); 0 picks one."""
        sock = listening_socket(host, port, reuse_port=reuse_port, backlog=4096)
        self._socket = sock
        self._ssl = tls
        return int(sock.getsockname()[1])

    # ---- life cycle ------------------------------------------------------------------------

    async def start(self) -> None:
        assert self._socket is not None, "add_port first"
        self.loop = asyncio.get_running_loop()
        self._closed = asyncio.Event()
        self._listener = await self.loop.create_server(
            lambda: Connection(self), sock=self._socket, ssl=self._ssl, backlog=4096
        )

    async def stop(self, grace: float | None) -> None:
        """No new connections or calls; calls running get `grace` seconds, then what is left
        is answered UNAVAILABLE and the connections close (grace None: wait for them)."""
        if self._listener is not None:
            self._listener.close()
        for conn in list(self.connections):
            conn.close_gracefully()
        if self.connections and grace != 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._all_closed(), timeout=grace)
        for conn in list(self.connections):
            conn.abort()
        if self.connections:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._all_closed(), timeout=1.0)
        if self._listener is not None:
            await self._listener.wait_closed()
            self._listener = None

    async def _all_closed(self) -> None:
        assert self._closed is not None
        while self.connections:
            self._closed.clear()
            await self._closed.wait()

    def connection_closed(self) -> None:
        if self._closed is not None:
            self._closed.set()

    def rest_contention(self) -> Callable[[], bool] | None:
        """None: REST needs no turn budget beside this transport (its calls start and answer
        in the loop turn their bytes arrive, as REST's do; server/api/http/fairness.py)."""
        return None


def tls_context(cert: str, key: str, ca: str = "") -> ssl.SSLContext:
    """TLS for the gRPC port: HTTP/2 negotiated by ALPN, as gRPC clients require; with `ca`,
    clients must present a certificate it signed (mutual TLS)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert, key)
    if ca:
        context.load_verify_locations(ca)
        context.verify_mode = ssl.CERT_REQUIRED
    context.set_alpn_protocols(["h2"])
    return context
