"""The MLflow backend's JSON-over-HTTP client: httpx, with every retry in one transport.

httpx does the HTTP: timeouts (connect, read, write and pool, each ``timeout_s``), URLs, bodies
and its error types. ``RetryingTransport`` wraps httpx's HTTPTransport and is the one place that
retries: a request that certainly never reached the server (the connection was refused or timed
out) goes again whatever its method; a request that may have (a read timeout, a reset, an HTTP
429 or 5xx answer) only when it is idempotent. Between attempts it waits ``backoff(failures)``,
by default registry_client.backoff's schedule 0.1, 0.2, 0.4 ... 2 s.

httpx's own ``HTTPTransport(retries=n)`` is not used: it retries connection failures only (no
5xx, 429 or timeouts), on httpcore's fixed schedule 0, 0.5, 1, 2, 4 ... s without a cap, through
a sleep that cannot be replaced.

Errors are translated once, where a call leaves this module (as httpx maps httpcore's):
transport trouble, once the retries are spent, is RegistryUnavailable naming the URL; any other
HTTP error is HttpStatusError with the server's error code, for the caller to translate.
"""

from __future__ import annotations

import functools
import json
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any

import httpx

from registry_client.backoff import exponential_backoff
from registry_client.errors import RegistryError, RegistryUnavailable

DEFAULT_TIMEOUT_S = 5.0
DEFAULT_RETRIES = 3
_CHUNK = 1 << 20
TRANSIENT_STATUS = frozenset({429, 500, 502, 503, 504})
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})

# Request extensions the client and RetryingTransport share (httpx passes them through).
IDEMPOTENT = "batchline.idempotent"  # a POST the caller says may be sent twice
SINK = "batchline.sink"  # write the body here (rewound on each attempt), not into memory
ATTEMPTS = "batchline.attempts"  # set by the transport: attempts made so far

Params = Mapping[str, str | int]

default_backoff: Callable[[int], float] = functools.partial(
    exponential_backoff, base_s=0.1, cap_s=2.0
)


class HttpStatusError(RegistryError):
    """The server answered with an HTTP error that retrying will not fix (a 4xx, mostly).

    `error_code` is the server's machine-readable code when its body says one (MLflow's
    ``RESOURCE_DOES_NOT_EXIST``, ``INVALID_PARAMETER_VALUE``, ...), else "".
    """

    def __init__(self, method: str, url: str, status: int, error_code: str, message: str) -> None:
        code = f" {error_code}" if error_code else ""
        super().__init__(f"{method} {url} answered HTTP {status}{code}: {message}")
        self.method = method
        self.url = url
        self.status = status
        self.error_code = error_code
        self.message = message

    def _reduce_args(self) -> tuple[Any, ...]:
        return (self.method, self.url, self.status, self.error_code, self.message)


class RetryingTransport(httpx.BaseTransport):
    """Retries transient failures of the wrapped transport, the body read inside the loop.

    A response leaves with its body read (into memory, or into the request's SINK), so a reset
    half way through a body is retried like any other failure. When no attempt is left the last
    error is raised, or the last transient answer (429, 5xx) returned; ATTEMPTS counts them.
    """

    def __init__(
        self,
        inner: httpx.BaseTransport,
        *,
        retries: int,
        backoff: Callable[[int], float],
        sleep: Callable[[float], None],
    ) -> None:
        self._inner = inner
        self._retries = retries
        self._backoff = backoff
        self._sleep = sleep

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        idempotent = bool(request.extensions.get(IDEMPOTENT, request.method in IDEMPOTENT_METHODS))
        failures = 0
        while True:
            request.extensions[ATTEMPTS] = failures + 1
            spent = failures >= self._retries
            try:
                response = self._attempt(request)
            except (httpx.ConnectError, httpx.ConnectTimeout):
                if spent:  # else: never reached the server, so safe to send again, POST or not
                    raise
            except httpx.TransportError:
                if spent or not idempotent:
                    raise
            else:
                if response.status_code not in TRANSIENT_STATUS or spent or not idempotent:
                    return response
            failures += 1
            self._sleep(self._backoff(failures))

    def _attempt(self, request: httpx.Request) -> httpx.Response:
        response = self._inner.handle_request(request)
        sink: IO[bytes] | None = request.extensions.get(SINK)
        try:
            if sink is None or response.status_code >= 400:
                response.read()
                return response
            sink.seek(0)
            sink.truncate()
            for chunk in response.iter_bytes(_CHUNK):
                sink.write(chunk)
            sink.flush()
        finally:
            response.close()
        # The body is in the sink; the caller gets the status and headers.
        return httpx.Response(
            response.status_code, headers=response.headers, extensions=response.extensions
        )

    def close(self) -> None:
        self._inner.close()


class _FileBody:
    """A file's bytes as a request body, read from the start on every attempt."""

    def __init__(self, path: Path) -> None:
        self._path = path

    def __iter__(self) -> Iterator[bytes]:
        with self._path.open("rb") as fh:
            while chunk := fh.read(_CHUNK):
                yield chunk


class JsonHttpClient:
    """Calls one HTTP(S) server's JSON API; thread-safe.

    Each call opens its own connection (no keep-alive: an idle pooled connection the server has
    closed would fail a POST that cannot be retried, and nothing is left open when the client is
    dropped). Retries: see RetryingTransport; `retries` more attempts at most.
    """

    def __init__(
        self,
        base_url: str,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        retries: int = DEFAULT_RETRIES,
        backoff: Callable[[int], float] = default_backoff,
        sleep: Callable[[float], None] = time.sleep,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        try:
            url = httpx.URL(base_url)
        except httpx.InvalidURL:
            url = httpx.URL("")
        if url.scheme not in {"http", "https"} or not url.host:
            raise RegistryError(f"not an http(s) URL: {base_url!r}")
        if retries < 0 or timeout_s <= 0:
            raise ValueError("retries must be >= 0 and timeout_s > 0")
        self._base = base_url.rstrip("/")
        inner = httpx.HTTPTransport(
            limits=httpx.Limits(max_keepalive_connections=0), proxy=_env_proxy(url)
        )
        self._client = httpx.Client(
            base_url=self._base,
            headers=dict(headers or {}),
            timeout=timeout_s,
            follow_redirects=True,  # as urllib did (a proxy sending http to https, say)
            transport=RetryingTransport(inner, retries=retries, backoff=backoff, sleep=sleep),
        )

    @property
    def base_url(self) -> str:
        return self._base

    def close(self) -> None:
        self._client.close()

    def get(self, path: str, params: Params | None = None) -> dict[str, Any]:
        return self._json("GET", path, params=params)

    def post(
        self, path: str, body: Mapping[str, Any], *, idempotent: bool = False
    ) -> dict[str, Any]:
        return self._json("POST", path, body=body, idempotent=idempotent)

    def put_file(self, path: str, source: Path) -> None:
        """Upload a file's bytes as the request body (streamed, not read into memory)."""
        headers = {
            "Content-Type": "application/octet-stream",
            "Content-Length": str(source.stat().st_size),
        }
        request = self._client.build_request(
            "PUT", path, content=_FileBody(source), headers=headers
        )
        self._send(request)

    def download(self, path: str, sink: IO[bytes], params: Params | None = None) -> None:
        """Stream a response body into `sink` (rewound and truncated before each attempt)."""
        request = self._client.build_request(
            "GET", path, params=_params(params), extensions={SINK: sink}
        )
        self._send(request)

    # -- the edge: httpx's errors become the registry's ---------------------------------------

    def _json(
        self,
        method: str,
        path: str,
        *,
        params: Params | None = None,
        body: Mapping[str, Any] | None = None,
        idempotent: bool = False,
    ) -> dict[str, Any]:
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = "application/json"
        request = self._client.build_request(
            method,
            path,
            params=_params(params),
            # json.dumps as before (httpx's own json= refuses NaN, which a metric may be)
            content=None if body is None else json.dumps(body).encode(),
            headers=headers,
            extensions={IDEMPOTENT: idempotent} if idempotent else None,
        )
        raw = self._send(request).content
        if not raw.strip():
            return {}
        try:
            doc = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            doc = None
        if not isinstance(doc, dict):
            raise RegistryError(
                f"{method} {request.url} answered with something other than a JSON "
                f"object ({raw[:80]!r}); is {self._base} the right server?"
            )
        return doc

    def _send(self, request: httpx.Request) -> httpx.Response:
        method, path = request.method, request.url.path
        try:
            response = self._client.send(request)
        except httpx.TransportError as exc:
            raise self._unavailable(request, method, path, _describe(exc)) from exc
        except httpx.HTTPError as exc:  # not transport trouble: a body it cannot decode, say
            raise RegistryError(f"{method} {request.url}: {_describe(exc)}") from exc
        status = response.status_code
        if status < 400:
            return response
        error_code, message = _error_body(response)
        if status in TRANSIENT_STATUS:
            detail = f"{error_code}: {message}" if error_code else message
            raise self._unavailable(request, method, path, f"HTTP {status} {detail}".strip())
        raise HttpStatusError(method, str(request.url), status, error_code, message)

    def _unavailable(
        self, request: httpx.Request, method: str, path: str, reason: str
    ) -> RegistryUnavailable:
        attempts = int(request.extensions.get(ATTEMPTS, 1))
        tries = f"{attempts} attempt{'s' if attempts > 1 else ''}"
        return RegistryUnavailable(self._base, f"{method} {path} failed after {tries}: {reason}")


def _params(params: Params | None) -> dict[str, str] | None:
    return {k: str(v) for k, v in params.items()} if params else None


def _env_proxy(url: httpx.URL) -> str | None:
    """The proxy the environment names for `url` (http_proxy, https_proxy, no_proxy), as
    urllib honoured them before; httpx ignores them once it is given its own transport."""
    if urllib.request.proxy_bypass(url.host):
        return None
    return urllib.request.getproxies().get(url.scheme)


def _error_body(response: httpx.Response) -> tuple[str, str]:
    raw = response.content
    try:
        doc = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        doc = None
    if isinstance(doc, dict):
        return str(doc.get("error_code", "")), str(doc.get("message", ""))
    text = raw.decode("utf-8", "replace").strip()
    return "", (text[:200] or response.reason_phrase)


def _describe(exc: BaseException) -> str:
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, ConnectionRefusedError):
            return "connection refused"
        cause = cause.__cause__ or cause.__context__
    if isinstance(exc, httpx.TimeoutException):
        return "timed out"
    return f"{type(exc).__name__}: {exc}".rstrip(": ")
