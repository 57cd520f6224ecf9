"""The Prometheus endpoint: `/metrics` (and `/metrics/`) only; every other path answers 404.

prometheus_client's own `start_http_server` answers the metrics on every path, so a client
probing Triton's or KServe's routes on the metrics port (`/v2/health/ready`, say) would read
200 and think a server is there.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterable
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

METRICS_PATHS = frozenset({"/metrics", "/metrics/"})
_NOT_FOUND = b"not found: metrics are served at /metrics\n"


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """No line on stderr per scrape."""


def metrics_app(registry: CollectorRegistry) -> Callable[..., Iterable[bytes]]:
    inner = make_wsgi_app(registry)

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if environ.get("PATH_INFO", "") in METRICS_PATHS:
            result: Iterable[bytes] = inner(environ, start_response)
            return result
        start_response(
            "404 Not Found",
            [
                ("Content-Type", "text/plain; charset=utf-8"),
                ("Content-Length", str(len(_NOT_FOUND))),
            ],
        )
        return [_NOT_FOUND]

    return app


def start_metrics_server(
    port: int, addr: str, registry: CollectorRegistry
) -> tuple[WSGIServer, threading.Thread]:
    """Serve `registry` at http://addr:port/metrics from a daemon thread."""

    class Server(ThreadingWSGIServer):
        address_family = socket.AF_INET6 if ":" in addr else socket.AF_INET

    httpd = make_server(addr, port, metrics_app(registry), Server, handler_class=_QuietHandler)
    thread = threading.Thread(target=httpd.serve_forever, name="metrics", daemon=True)
    thread.start()
    return httpd, thread
