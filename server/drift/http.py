"""The drift sidecar's HTTP endpoint: a minimal HTTP/1.1 GET server on the event loop for
/metrics, /report, /report.json and /healthz, with the token rules for ?refresh=1.
`HttpEndpoint` is mixed into `Sidecar`, which supplies the monitor, guard, registry and host.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from urllib.parse import parse_qs

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from server.drift import is_loopback
from server.drift.monitor import DriftMonitor
from server.drift.report import render_html, report_to_dict
from server.drift.service import TokenGuard

log = logging.getLogger("server.drift.sidecar")  # the sidecar's logger, in each of its parts
_HTTP_TIMEOUT_S = 10.0


class HttpEndpoint:
    """The HTTP side of `Sidecar` (serve with `asyncio.start_server(self._serve_http, ...)`)."""

    monitor: DriftMonitor
    guard: TokenGuard
    registry: CollectorRegistry
    http_host: str

    # A minimal HTTP/1.1 GET endpoint on the event loop: Prometheus scrapes and a report page
    # need nothing more, and staying on the loop means no locking around the monitor.
    async def _serve_http(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), _HTTP_TIMEOUT_S)
            lines = head.decode("latin-1").split("\r\n")
            method, target, _ = lines[0].split(" ", 2)
            authorization = None
            for line in lines[1:]:
                name, sep, value = line.partition(":")
                if sep and name.strip().lower() == "authorization":
                    authorization = value.strip()
            peer = writer.get_extra_info("peername")
            status, ctype, body = self._route(method, target, authorization, str(peer or ""))
            extra = (
                'WWW-Authenticate: Bearer realm="batchline-drift"\r\n'
                if status[:3] == "401"
                else ""
            )
            writer.write(
                f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\n{extra}"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
            )
            if method != "HEAD":
                writer.write(body)
            await asyncio.wait_for(writer.drain(), _HTTP_TIMEOUT_S)
        except (TimeoutError, ConnectionError, ValueError, asyncio.IncompleteReadError):
            pass
        except asyncio.LimitOverrunError:
            writer.write(
                b"HTTP/1.1 431 Request Header Fields Too Large\r\nConnection: close\r\n\r\n"
            )
        except Exception:
            log.exception("drift HTTP request failed")
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    def _route(
        self, method: str, target: str, authorization: str | None = None, peer: str = ""
    ) -> tuple[str, str, bytes]:
        if method not in ("GET", "HEAD"):
            return "405 Method Not Allowed", "text/plain", b"GET only\n"
        path, _, query = target.partition("?")
        params = {k: v[-1] for k, v in parse_qs(query).items()}
        model, version = params.get("model", ""), params.get("version", "")
        # The last evaluation unless asked (?refresh=1): a page load must not be a way to make
        # the sidecar evaluate every window on demand.
        refresh = params.get("refresh", "0") not in ("0", "false")
        if refresh and path in ("/report.json", "/report", "/"):
            # Evaluating now changes state (alerts may fire, alert_command may run).
            if self.guard.enabled and not self.guard.allows(authorization):
                self.guard.refuse(f"HTTP {path}?refresh", peer)
                return (
                    "401 Unauthorized",
                    "text/plain",
                    b"refresh needs the header Authorization: Bearer <token> ([drift] token); "
                    b"without ?refresh=1 the page shows the last evaluation\n",
                )
            if not self.guard.enabled and not is_loopback(self.http_host):
                return (
                    "403 Forbidden",
                    "text/plain",
                    b"refresh is refused: no drift token is set and HTTP listens beyond loopback "
                    b"(set BATCHLINE_DRIFT_TOKEN or --token-file); without ?refresh=1 the page "
                    b"shows the last evaluation\n",
                )
        if path == "/metrics":
            return "200 OK", CONTENT_TYPE_LATEST, generate_latest(self.registry)
        if path == "/report.json":
            report = self.monitor.report(model, version, refresh=refresh)
            body = json.dumps(report_to_dict(report), indent=1).encode()
            return "200 OK", "application/json", body
        if path in ("/report", "/"):
            report = self.monitor.report(model, version, refresh=refresh)
            return "200 OK", "text/html; charset=utf-8", render_html(report).encode()
        if path == "/healthz":
            return "200 OK", "text/plain", b"ok\n"
        return "404 Not Found", "text/plain", b"not found: try /metrics, /report, /report.json\n"
