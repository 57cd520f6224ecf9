"""The REST binding's HTTP/1.1 server: uvicorn's httptools protocol on the process's event loop.

uvicorn is used as a library (no `uvicorn.run`, no signal handlers, no lifespan): the socket is
bound here (SO_REUSEPORT with several workers, port 0 read back), `Server.startup` serves it on
the running uvloop loop beside grpc.aio, and `stop` closes it after the App's drain.

Two additions to uvicorn's protocol. A response goes out in one write: uvicorn writes the status
line and headers, then the body, each a send() system call of its own; `_CoalescingTransport`
holds the header block until the body follows (or the loop turns), one syscall instead of two.
And every request must arrive whole (headers and body) within
`request_timeout_s` of its first byte, and a new connection must start one within that time too;
otherwise the client gets 408 and the connection is closed. uvicorn itself times out only idle
keep-alive connections, so a client that stops half-way through its body would hold its
connection (and the request's buffer) for ever. Slow clients never block the loop: the protocol
only buffers what arrives.
"""

from __future__ import annotations

import asyncio
import logging
import math
import socket
import ssl
from typing import Any

import orjson
import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from server.api.http.app import RestApp
from server.net import listening_socket

log = logging.getLogger(__name__)


class _CoalescingTransport:
    """A transport whose header-block writes (ending in a blank line) wait for the next write
    or the end of the loop turn, whichever comes first; everything else is the transport's."""

    __slots__ = ("_flush", "_held", "_loop", "_transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._held: bytes | None = None
        self._flush: asyncio.Handle | None = None

    def write(self, data: bytes) -> None:
        held = self._held
        if held is None:
            if data.endswith(b"\r\n\r\n"):
                self._held = data
                self._flush = self._loop.call_soon(self.flush)
            else:
                self._transport.write(data)
            return
        self._held = None
        if self._flush is not None:
            self._flush.cancel()
            self._flush = None
        self._transport.write(held + data)

    def flush(self) -> None:
        self._flush = None
        held = self._held
        if held is not None:
            self._held = None
            self._transport.write(held)

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class TimedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol writing each response once, with a deadline on receiving
    each request."""

    request_timeout_s: float = 60.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._deadline: asyncio.TimerHandle | None = None
        self._receiving = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        # FlowControl keeps the real transport; requests' cycles get the coalescing one.
        self.transport = _CoalescingTransport(transport, self.loop)  # type: ignore[assignment]
        self._arm()  # the first request must begin (and end) in time

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        # Armed only when a request is still incomplete after this read: a request that
        # arrives in one read (nearly all of them) costs no timer.
        if self._receiving and self._deadline is None:
            self._arm()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._receiving = True

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._receiving = False
        self._disarm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(self.request_timeout_s, self._expired)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expired(self) -> None:
        self._deadline = None
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if not self._receiving and self.cycle is not None and not self.cycle.response_complete:
            return  # the request arrived; the app is answering it
        cycle = self.cycle
        if cycle is None or cycle.response_complete or not cycle.response_started:
            body = orjson.dumps(
                {
                    "error": f"the request did not arrive within {self.request_timeout_s:g} s "
                    "(server.http_request_timeout_s)"
                }
            )
            transport.write(
                b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
                b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(body), body)
            )
            if cycle is not None and not cycle.response_complete:
                cycle.response_started = cycle.response_complete = True
        transport.close()


def _bind(host: str, port: int, reuse_port: bool) -> socket.socket:
    try:
        return listening_socket(host, port, reuse_port=reuse_port, backlog=2048)
    except OSError as exc:
        raise OSError(
            exc.errno, f"cannot bind the HTTP port {host}:{port}: {exc.strerror}"
        ) from None


class RestServer:
    """The HTTP listener for a RestApp; `start` returns the bound port."""

    def __init__(
        self,
        app: RestApp,
        *,
        host: str,
        port: int,
        reuse_port: bool = False,
        tls_cert: str = "",
        tls_key: str = "",
        tls_ca: str = "",
        request_timeout_s: float = 60.0,
        keep_alive_s: float = 75.0,
    ) -> None:
        self._app = app
        self._host = host
        self._port = port
        self._reuse_port = reuse_port
        protocol = type(
            "RestHttpProtocol", (TimedHttpToolsProtocol,), {"request_timeout_s": request_timeout_s}
        )
        self._config = uvicorn.Config(
            app,
            http=protocol,
            ws="none",
            lifespan="off",
            interface="asgi3",
            access_log=False,
            log_config=None,
            proxy_headers=False,
            server_header=False,
            timeout_keep_alive=int(max(1, keep_alive_s)),
            ssl_certfile=tls_cert or None,
            ssl_keyfile=tls_key or None,
            ssl_ca_certs=tls_ca or None,
            ssl_cert_reqs=ssl.CERT_REQUIRED if tls_ca else ssl.CERT_NONE,
        )
        self._server: uvicorn.Server | None = None
        self._socket: socket.socket | None = None
        self._ticker: asyncio.Task[None] | None = None
        self.port = 0

    async def start(self) -> int:
        config = self._config
        config.load()
        self._socket = _bind(self._host, self._port, self._reuse_port)
        server = self._server = uvicorn.Server(config)
        server.lifespan = config.lifespan_class(config)
        await server.startup(sockets=[self._socket])
        # uvicorn's once-a-tick housekeeping (the Date header) without its signal handling.
        self._ticker = asyncio.create_task(server.main_loop())
        self.port = self._socket.getsockname()[1]
        return self.port

    async def stop(self, timeout_s: float = 5.0) -> None:
        """Close the listener, let answering requests finish (bounded), close connections."""
        server = self._server
        if server is None:
            return
        self._server = None
        server.should_exit = True
        server.config.timeout_graceful_shutdown = max(1, math.ceil(timeout_s))
        if self._ticker is not None:
            await self._ticker
        await server.shutdown(sockets=[self._socket] if self._socket is not None else None)
