"""The Open Inference Protocol's HTTP/REST binding as a raw ASGI app (no web framework).

Every call goes through the data plane the gRPC servicers use (server/dataplane): an inference
is `plane.resolve` -> the codec's Decoder (the same validation, fed by `tensors.Parser`) ->
`plane.infer`, so REST and gRPC requests share batches, routes, features, breakers, mirroring
and drift. Routes:

    GET  /v2/health/live | /v2/health/ready | /v2
    GET  /v2/models/{m}[/versions/{v}]            metadata
    GET  /v2/models/{m}[/versions/{v}]/ready | /config | /stats,   GET /v2/models/stats
    POST /v2/models/{m}[/versions/{v}]/infer
    POST /v2/repository/index,  POST /v2/repository/models/{m}/load | /unload   (admin)

Errors answer {"error": "..."} with KServe's status mapping (`STATUS`).
"""

from __future__ import annotations

import asyncio
import gzip
import logging
import time
import zlib
from collections.abc import Awaitable, Callable
from typing import Any

import orjson

from server.api.admin import AdminGuard
from server.api.codec import Decoder
from server.api.http.fairness import DEFAULT_PER_TURN, TurnBudget
from server.api.http.tensors import JSON, OCTET_STREAM, Parser, encode_response
from server.api.status import details
from server.clock import Clock
from server.dataplane import DataPlane
from server.errors import ErrorKind, InvalidArgument, ServingError, TooLarge
from server.types import Trace, Tracer

log = logging.getLogger(__name__)

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

# ErrorKind -> HTTP status, as KServe documents it (400 bad input, 404 unknown model, 429 shed,
# 503 not ready or draining, 500 the model failed) plus what HTTP names exactly.
STATUS: dict[ErrorKind, int] = {
    ErrorKind.INVALID_ARGUMENT: 400,
    ErrorKind.NOT_FOUND: 404,
    ErrorKind.RESOURCE_EXHAUSTED: 429,
    ErrorKind.DEADLINE_EXCEEDED: 504,
    ErrorKind.UNAVAILABLE: 503,
    ErrorKind.CANCELLED: 499,
    ErrorKind.UNAUTHENTICATED: 401,
    ErrorKind.FAILED_PRECONDITION: 400,
    ErrorKind.INTERNAL: 500,
}


class HttpError(Exception):
    """A refusal that is HTTP's own (no such route, wrong method, body too large)."""

    def __init__(self, status: int, message: str, *, close: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.close = close
        self.allow: str = ""


class ClientGone(Exception):
    """The client went away (or was timed out) before its body arrived."""


def _error(message: str) -> bytes:
    return orjson.dumps({"error": details(message)})


def _status(exc: ServingError) -> int:
    if isinstance(exc, TooLarge):
        return 413
    return STATUS.get(exc.kind, 500)


# Bodies above this are inflated and parsed in a worker thread: orjson and zlib on a large body
# would hold the loop for a long stretch (zlib lets go of the GIL; orjson and numpy give the
# loop its turn at every GIL switch), so other requests keep being served meanwhile.
OFFLOAD_BYTES = 256 * 1024

_CT_JSON = (b"content-type", JSON.encode())
_CT_OCTET = (b"content-type", OCTET_STREAM.encode())
_CLOSE = (b"connection", b"close")
_VARY = (b"vary", b"accept-encoding")
# Replies shorter than this go out as they are whatever Accept-Encoding says (Triton's front
# compresses every reply; a few dozen bytes only grow under gzip's 18-byte frame).
COMPRESS_MIN_BYTES = 256
_EMPTY = b"{}"


class RestApp:
    """ASGI 3 app: `await app(scope, receive, send)` per HTTP request."""

    def __init__(
        self,
        plane: DataPlane,
        clock: Clock,
        *,
        max_tensor_elements: int,
        max_request_id_bytes: int,
        max_body_bytes: int,
        guard: AdminGuard,
        tracing: Tracer | None = None,
        grpc_busy: Callable[[], bool] | None = None,
        per_turn: int = DEFAULT_PER_TURN,
    ) -> None:
        self._plane = plane
        self._clock = clock
        self._max_body = max_body_bytes
        self._guard = guard
        self._tracing = tracing
        self._parser = Parser()
        self._decoder = Decoder(max_tensor_elements, max_request_id_bytes, "http")
        # While gRPC calls are in flight, REST starts a bounded number of requests per loop
        # turn (fairness.py), so the two bindings share the loop.
        self._budget = TurnBudget(per_turn, grpc_busy) if grpc_busy is not None else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return  # lifespan is off and no websocket route exists
        extra: list[tuple[bytes, bytes]] = []
        try:
            status, body, extra = await self._route(scope, receive)
        except ServingError as exc:
            status, body = _status(exc), _error(exc.message)
        except HttpError as exc:
            status, body = exc.status, _error(exc.message)
            if exc.close:
                extra = [_CLOSE]
            if exc.allow:
                extra.append((b"allow", exc.allow.encode()))
        except ClientGone:
            return
        except Exception as exc:  # a bug: answered, logged, never a traceback to the client
            log.exception("REST request %s %s failed", scope["method"], scope["path"])
            status, body = 500, _error(f"internal error: {type(exc).__name__}")
        coding = _accepted_coding(scope["headers"]) if len(body) >= COMPRESS_MIN_BYTES else None
        if coding is not None:
            if len(body) > OFFLOAD_BYTES:
                body = await asyncio.to_thread(_compress, body, coding)
            else:
                body = _compress(body, coding)
            extra = [*extra, (b"content-encoding", coding), _VARY]
        headers = [(b"content-length", b"%d" % len(body))]
        if _CT_OCTET not in extra:
            headers.append(_CT_JSON)
        headers += extra
        if not self._plane.ready():
            headers.append(_CLOSE)  # draining: let keep-alive clients reconnect elsewhere
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    # ---- routing ---------------------------------------------------------------------------

    async def _route(
        self, scope: Scope, receive: Receive
    ) -> tuple[int, bytes, list[tuple[bytes, bytes]]]:
        method = scope["method"]
        parts = scope["path"].split("/")
        # parts[0] is "" (the path starts with "/"); a trailing "/" leaves a last "".
        if parts and parts[-1] == "":
            parts.pop()
        if len(parts) < 2 or parts[1] != "v2":
            raise HttpError(404, f"no route for {scope['path']} (the V2 API lives under /v2)")
        n = len(parts)
        if n >= 4 and parts[2] == "models":
            if n == 4 and parts[3] == "stats":
                self._method(method, "GET")
                return 200, self._stats(None, ""), []
            name, version, action = self._model_path(parts, scope["path"])
            if action == "infer":
                self._method(method, "POST")
                return await self._infer(scope, receive, name, version)
            self._method(method, "GET")
            if action == "":
                return 200, self._metadata(name, version), []
            if action == "ready":
                return self._model_ready(name, version)
            if action == "config":
                return 200, orjson.dumps(self._plane.model_config(name, version or None)), []
            if action == "stats":
                return 200, self._stats(name, version), []
            raise HttpError(404, f"no route for {scope['path']}")
        if n == 2:
            self._method(method, "GET")
            return 200, orjson.dumps(self._plane.server_metadata()), []
        if n == 4 and parts[2] == "health" and parts[3] in ("live", "ready"):
            self._method(method, "GET")
            if parts[3] == "live":
                return 200, b'{"live":true}', []
            if self._plane.ready():
                return 200, b'{"ready":true}', []
            return 503, b'{"ready":false}', []
        if n >= 4 and parts[2] == "repository":
            return await self._repository(scope, receive, parts)
        raise HttpError(404, f"no route for {scope['path']}")

    @staticmethod
    def _method(method: str, allowed: str) -> None:
        if method == allowed or (method == "HEAD" and allowed == "GET"):
            return
        exc = HttpError(405, f"method {method} is not allowed here; use {allowed}")
        exc.allow = allowed
        raise exc

    @staticmethod
    def _model_path(parts: list[str], path: str) -> tuple[str, str, str]:
        """/v2/models/{m}[/versions/{v}][/{action}] -> (m, v, action)."""
        name = parts[3]
        rest = parts[4:]
        version = ""
        if rest and rest[0] == "versions":
            if len(rest) < 2 or not rest[1]:
                raise HttpError(404, f"no route for {path} (expected /versions/VERSION)")
            version = rest[1]
            rest = rest[2:]
        if len(rest) > 1 or not name:
            raise HttpError(404, f"no route for {path}")
        return name, version, rest[0] if rest else ""

    # ---- metadata --------------------------------------------------------------------------

    def _metadata(self, name: str, version: str) -> bytes:
        return orjson.dumps(self._plane.model_metadata(name, version or None))

    def _model_ready(self, name: str, version: str) -> tuple[int, bytes, list[tuple[bytes, bytes]]]:
        ready = self._plane.model_ready(name, version or None)  # unknown: 404
        return (200 if ready else 503), orjson.dumps({"name": name, "ready": ready}), []

    def _stats(self, name: str | None, version: str) -> bytes:
        return orjson.dumps(self._plane.model_statistics(name or "", version or None))

    # ---- admin -----------------------------------------------------------------------------

    async def _repository(
        self, scope: Scope, receive: Receive, parts: list[str]
    ) -> tuple[int, bytes, list[tuple[bytes, bytes]]]:
        n = len(parts)
        if n == 4 and parts[3] == "index":
            self._method(scope["method"], "POST")
            await self._body(scope, receive)  # {"ready": ...} filters nothing: all are READY
            return 200, orjson.dumps(self._plane.repository_index()), []
        if n == 6 and parts[3] == "models" and parts[5] in ("load", "unload"):
            self._method(scope["method"], "POST")
            self._admin(scope)
            await self._body(scope, receive)
            name = parts[4]
            if parts[5] == "unload":
                self._plane.unload(name)
            else:
                await self._plane.reload(name)
            return 200, _EMPTY, []
        raise HttpError(404, f"no route for {scope['path']}")

    def _admin(self, scope: Scope) -> None:
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"]]
        if self._guard.allowed(headers):
            return
        token_required, message = self._guard.refusal("header Authorization: Bearer <token>")
        if token_required:
            raise HttpError(401, message)
        raise HttpError(403, message)

    # ---- inference -------------------------------------------------------------------------

    async def _body(self, scope: Scope, receive: Receive) -> tuple[bytes, int | None]:
        """The whole request body (bounded by max_message_bytes, decompressed if it came
        compressed) and the Inference-Header-Content-Length header's value, if any."""
        limit = self._max_body
        header_length = None
        encoding = b""
        for key, value in scope["headers"]:
            if key == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    raise HttpError(400, "Content-Length is not an integer", close=True) from None
                if declared > limit:
                    raise HttpError(
                        413,
                        f"the request body has {declared} bytes; the limit is {limit} "
                        "(max_message_bytes)",
                        close=True,
                    )
            elif key == b"inference-header-content-length":
                try:
                    header_length = int(value)
                except ValueError:
                    header_length = -1
                if header_length < 0:
                    raise InvalidArgument(
                        "Inference-Header-Content-Length: expected an integer >= 0, got "
                        f"{value.decode('latin-1')!r}"
                    )
            elif key == b"content-encoding":
                encoding = value.strip().lower()
        message = await receive()
        if message["type"] != "http.request":
            raise ClientGone()
        body: bytes = message.get("body", b"")
        if message.get("more_body", False):
            chunks = [body]
            size = len(body)
            while True:
                message = await receive()
                if message["type"] != "http.request":
                    raise ClientGone()
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > limit:
                    raise HttpError(
                        413,
                        f"the request body is over the limit of {limit} bytes (max_message_bytes)",
                        close=True,
                    )
                chunks.append(chunk)
                if not message.get("more_body", False):
                    break
            body = b"".join(chunks)
        elif len(body) > limit:
            raise HttpError(
                413,
                f"the request body has {len(body)} bytes; the limit is {limit} (max_message_bytes)",
                close=True,
            )
        if encoding and encoding != b"identity":
            if len(body) > OFFLOAD_BYTES // 8:
                body = await asyncio.to_thread(_decompress, body, encoding, limit)
            else:
                body = _decompress(body, encoding, limit)
        return body, header_length

    async def _infer(
        self, scope: Scope, receive: Receive, name: str, version: str
    ) -> tuple[int, bytes, list[tuple[bytes, bytes]]]:
        body, header_length = await self._body(scope, receive)
        budget = self._budget
        if budget is not None and not budget.try_admit():
            await budget.wait()
        trace = None
        if self._tracing is not None:
            trace = self._tracing.start_request(
                "ModelInfer",
                [(k.decode("latin-1"), v) for k, v in scope["headers"]],
                {"rpc.system": "http", "batchline.model": name},
            )
        try:
            status, reply, extra = await self._run(body, header_length, name, version, trace)
        except ServingError as exc:
            if trace is not None:
                trace.end(exc.kind.name, exc.message)
            raise
        except asyncio.CancelledError:
            if trace is not None:
                trace.end("CANCELLED")
            raise
        except BaseException:
            if trace is not None:
                trace.end("INTERNAL")
            raise
        if trace is not None:
            trace.end()
        return status, reply, extra

    async def _run(
        self,
        body: bytes,
        header_length: int | None,
        name: str,
        version: str,
        trace: Trace | None,
    ) -> tuple[int, bytes, list[tuple[bytes, bytes]]]:
        # The gRPC servicer's steps (server/api/servicer.InferenceServicer._infer), with the
        # REST request parsed into the shape its codec reads.
        plane = self._plane
        served = plane.resolve(name, version)
        try:
            if len(body) > OFFLOAD_BYTES:
                request = await asyncio.to_thread(
                    self._parser.parse, body, header_length, name, version
                )
            else:
                request = self._parser.parse(body, header_length, name, version)
        except ServingError as exc:
            self._decoder.refused(served, exc)
            raise
        # version None: the caller named no version, so routing (canary) may choose one.
        decoded = self._decoder.decode(served, request, version or None, None)
        decoded.trace = trace
        result = await plane.infer(served, decoded)
        if trace is None:
            parts, header = encode_response(result, request)
        else:
            began = time.time_ns()
            parts, header = encode_response(result, request)
            trace.child("encode", began, time.time_ns())
        if header is None:
            return 200, parts[0], []
        return (
            200,
            b"".join(parts),
            [(b"inference-header-content-length", b"%d" % header), _CT_OCTET],
        )


def _accepted_coding(headers: list[tuple[bytes, bytes]]) -> bytes | None:
    """gzip or deflate if the request's Accept-Encoding takes one (gzip first, as Triton's HTTP
    front does), else None. A coding given q=0 is refused by the client, so not used."""
    for key, value in headers:
        if key != b"accept-encoding":
            continue
        taken = set()
        for item in value.lower().split(b","):
            coding, _, params = item.strip().partition(b";")
            q = params.strip()
            if q.startswith(b"q=") and q[2:].strip() in (b"0", b"0.0", b"0.00", b"0.000"):
                continue
            taken.add(coding.strip())
        for coding in (b"gzip", b"deflate"):
            if coding in taken:
                return coding
        return None
    return None


def _compress(body: bytes, coding: bytes) -> bytes:
    # Level 1: replies are small and the loop's time is what a server has least of; most of
    # the ratio comes from the first level (float tensors barely compress further).
    if coding == b"gzip":
        return gzip.compress(body, compresslevel=1, mtime=0)
    return zlib.compress(body, 1)  # HTTP's "deflate" is the zlib format (RFC 9110 8.4.1.2)


def _decompress(body: bytes, encoding: bytes, limit: int) -> bytes:
    if encoding == b"gzip":
        inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
    elif encoding == b"deflate":
        inflater = zlib.decompressobj(zlib.MAX_WBITS)
    else:
        raise HttpError(
            415,
            f"Content-Encoding {encoding.decode('latin-1')!r} is not supported "
            "(gzip, deflate or identity)",
        )
    try:
        out = inflater.decompress(body, limit + 1)
    except zlib.error as exc:
        raise InvalidArgument(
            f"the body is not valid {encoding.decode()} (Content-Encoding): {exc}"
        ) from None
    if len(out) > limit or inflater.unconsumed_tail:
        raise HttpError(
            413,
            f"the decompressed request body is over the limit of {limit} bytes (max_message_bytes)",
        )
    return out
