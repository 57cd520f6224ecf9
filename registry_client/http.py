"""A small JSON-over-HTTP client on urllib, retrying transient failures with capped backoff.

Standard library only, so that talking to an MLflow server pulls no HTTP stack (and no
``mlflow``) into the inference server. Transport trouble (refused, reset, timed out, HTTP 429 or
5xx) is retried and, once the retries are spent, raised as RegistryUnavailable naming the URL;
any other HTTP error is raised at once as HttpStatusError, for the caller to translate.
"""

from __future__ import annotations

import http.client
import json
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any, TypeVar

from registry_client.backoff import exponential_backoff
from registry_client.errors import RegistryError, RegistryUnavailable

DEFAULT_TIMEOUT_S = 5.0
DEFAULT_RETRIES = 3
_CHUNK = 1 << 20
_TRANSIENT_STATUS = frozenset({429, 500, 502, 503, 504})

Params = Mapping[str, str | int]
_T = TypeVar("_T")


def backoff_delay(failures: int, *, base_s: float = 0.1, cap_s: float = 2.0) -> float:
    """Seconds to wait after the `failures`-th transient failure in a row: 0.1, 0.2, 0.4, ... 2.0."""
    return exponential_backoff(failures, base_s, cap_s)


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


class _Transient(Exception):
    def __init__(self, reason: str, *, sent: bool) -> None:
        super().__init__(reason)
        self.reason = reason
        # False when the request certainly never reached the server (connection refused):
        # then even a non-idempotent request is safe to send again.
        self.sent = sent


class JsonHttpClient:
    """Calls one HTTP(S) server's JSON API; thread-safe (every call opens its own connection).

    Retries: up to `retries` more attempts after a transient failure, sleeping
    ``backoff(failure_count)`` between them. A request that may have reached the server is
    retried only when the caller marks it idempotent (GET, PUT and DELETE always are).
    """

    def __init__(
        self,
        base_url: str,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        retries: int = DEFAULT_RETRIES,
        backoff: Callable[[int], float] = backoff_delay,
        sleep: Callable[[float], None] = time.sleep,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        parts = urllib.parse.urlsplit(base_url)
        if parts.scheme not in {"http", "https"} or not parts.netloc:
            raise RegistryError(f"not an http(s) URL: {base_url!r}")
        if retries < 0 or timeout_s <= 0:
            raise ValueError("retries must be >= 0 and timeout_s > 0")
        self._base = base_url.rstrip("/")
        self._timeout_s = timeout_s
        self._retries = retries
        self._backoff = backoff
        self._sleep = sleep
        self._headers = dict(headers or {})
        self._opener = urllib.request.build_opener()

    @property
    def base_url(self) -> str:
        return self._base

    def get(self, path: str, params: Params | None = None) -> dict[str, Any]:
        return self._json("GET", path, params=params, idempotent=True)

    def post(
        self, path: str, body: Mapping[str, Any], *, idempotent: bool = False
    ) -> dict[str, Any]:
        return self._json("POST", path, body=body, idempotent=idempotent)

    def delete(self, path: str, body: Mapping[str, Any]) -> dict[str, Any]:
        return self._json("DELETE", path, body=body, idempotent=True)

    def put_file(self, path: str, source: Path) -> None:
        """Upload a file's bytes as the request body (streamed, not read into memory)."""
        size = source.stat().st_size

        def attempt() -> None:
            with source.open("rb") as body:
                request = self._request(
                    "PUT",
                    path,
                    data=body,
                    headers={
                        "Content-Type": "application/octet-stream",
                        "Content-Length": str(size),
                    },
                )
                with self._open(request) as response:
                    response.read()

        self._with_retries("PUT", path, attempt, idempotent=True)

    def download(self, path: str, sink: IO[bytes], params: Params | None = None) -> None:
        """Stream a response body into `sink` (rewound and truncated before each attempt)."""

        def attempt() -> None:
            sink.seek(0)
            sink.truncate()
            with self._open(self._request("GET", path, params=params)) as response:
                while chunk := response.read(_CHUNK):
                    sink.write(chunk)
            sink.flush()

        self._with_retries("GET", path, attempt, idempotent=True)

    # -- internals ---------------------------------------------------------------------------

    def _json(
        self,
        method: str,
        path: str,
        *,
        params: Params | None = None,
        body: Mapping[str, Any] | None = None,
        idempotent: bool,
    ) -> dict[str, Any]:
        data = None if body is None else json.dumps(body).encode()
        headers = {"Accept": "application/json"}
        if data is not None:
            headers["Content-Type"] = "application/json"

        def attempt() -> dict[str, Any]:
            request = self._request(method, path, params=params, data=data, headers=headers)
            with self._open(request) as response:
                raw = response.read()
            if not raw.strip():
                return {}
            try:
                doc = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError):
                doc = None
            if not isinstance(doc, dict):
                raise RegistryError(
                    f"{method} {request.full_url} answered with something other than a JSON "
                    f"object ({raw[:80]!r}); is {self._base} the right server?"
                )
            return doc

        return self._with_retries(method, path, attempt, idempotent=idempotent)

    def _request(
        self,
        method: str,
        path: str,
        *,
        params: Params | None = None,
        data: bytes | IO[bytes] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> urllib.request.Request:
        url = self._base + path
        if params:
            url += "?" + urllib.parse.urlencode({k: str(v) for k, v in params.items()})
        return urllib.request.Request(
            url, data=data, method=method, headers={**self._headers, **(headers or {})}
        )

    def _open(self, request: urllib.request.Request) -> http.client.HTTPResponse:
        """Open a request; raise _Transient for retryable trouble, HttpStatusError otherwise."""
        method = request.get_method()
        try:
            response: http.client.HTTPResponse = self._opener.open(request, timeout=self._timeout_s)
        except urllib.error.HTTPError as exc:
            status = exc.code
            try:
                error_code, message = _error_body(exc)
            finally:
                exc.close()
            if status in _TRANSIENT_STATUS:
                detail = f"{error_code}: {message}" if error_code else message
                raise _Transient(f"HTTP {status} {detail}".strip(), sent=True) from exc
            raise HttpStatusError(method, request.full_url, status, error_code, message) from exc
        except urllib.error.URLError as exc:
            reason = exc.reason
            refused = isinstance(reason, ConnectionRefusedError)
            raise _Transient(_describe(reason), sent=not refused) from exc
        except (OSError, http.client.HTTPException) as exc:  # timeouts, resets, bad status lines
            raise _Transient(_describe(exc), sent=True) from exc
        return response

    def _with_retries(
        self, method: str, path: str, attempt: Callable[[], _T], *, idempotent: bool
    ) -> _T:
        failures = 0
        while True:
            try:
                return attempt()
            except _Transient as exc:
                failure = exc
            except (OSError, http.client.HTTPException) as exc:  # failed while reading the body
                failure = _Transient(_describe(exc), sent=True)
            failures += 1
            if failures > self._retries or (failure.sent and not idempotent):
                tries = f"{failures} attempt{'s' if failures > 1 else ''}"
                raise RegistryUnavailable(
                    self._base, f"{method} {path} failed after {tries}: {failure.reason}"
                ) from failure
            self._sleep(self._backoff(failures))


def _error_body(exc: urllib.error.HTTPError) -> tuple[str, str]:
    try:
        raw = exc.read()
    except (OSError, http.client.HTTPException):
        raw = b""
    try:
        doc = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        doc = None
    if isinstance(doc, dict):
        return str(doc.get("error_code", "")), str(doc.get("message", ""))
    text = raw.decode("utf-8", "replace").strip()
    return "", (text[:200] or str(exc.reason))


def _describe(reason: object) -> str:
    if isinstance(reason, ConnectionRefusedError):
        return "connection refused"
    if isinstance(reason, TimeoutError):
        return "timed out"
    if isinstance(reason, BaseException):
        return f"{type(reason).__name__}: {reason}".rstrip(": ")
    return str(reason)
