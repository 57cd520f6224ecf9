"""The drift sidecar (`batchline drift`): its own process, so the serving path computes nothing.

gRPC (DriftService, default port 8011) takes the producers' record streams, label posts and
report requests; HTTP (default port 8012) serves Prometheus metrics on their own registry
(`/metrics`), the report as an HTML page (`/report`) and as JSON (`/report.json`).

Per (model, version, role) a `RowWindow` keeps the last `window_rows` rows and their arrival
times; an evaluation looks at the rows of the last `window_s` seconds among them (0: no time
limit) and compares each feature and the score with the version's reference profile. Windows are
evaluated every `eval_every_records` records (but not twice within `eval_min_interval_s`) or
every `eval_every_s` seconds, never per record.
Labels posted back by request id join a bounded memory of recent predictions and feed a rolling
accuracy and AUC. Memory is bounded whatever the traffic: at most `max_windows` windows of fixed
size, `label_memory_rows` remembered prediction rows taking at most `label_memory_bytes`, ids and
names of bounded size (longer ones are rejected and counted), and bounded caches.

Trust: both listeners bind 127.0.0.1 unless told otherwise (`host` for gRPC, `http_host` for
HTTP; the sidecar shares the pod with its server). With a shared token (`token_file`,
BATCHLINE_DRIFT_TOKEN) Record, PostLabels and a refreshing Report need `authorization: Bearer
TOKEN` (else UNAUTHENTICATED), and so does an HTTP `?refresh=1` (else 401); without one, a
listener off loopback is warned about at start-up, and HTTP refreshes off loopback are refused
(403): the page still serves the last evaluation. /metrics, /report and /healthz stay open to
read (a Prometheus scrape carries no token).

The parts: `windows` (ring buffers), `monitor` (state and decisions), `alerts` (what a fired
alert does), `service` (gRPC and the token), `http` (the HTTP endpoint), `metrics` (the
Prometheus collector); this module wires them from the settings and runs them.

Everything runs on one event loop (the HTTP endpoint is asyncio too), so no state is shared
between threads.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
from prometheus_client import CollectorRegistry

from registry_client import FileRegistry, RegistryError
from server._proto import drift_pb2_grpc as pb_grpc
from server.clock import Clock
from server.drift import (
    DriftSettings,
    add_arguments,
    is_loopback,
    settings_from_args,
)
from server.drift.alerts import AlertActions
from server.drift.http import HttpEndpoint
from server.drift.metrics import SidecarCollector
from server.drift.monitor import DriftMonitor, ProfileLoader
from server.drift.profile import PROFILE_FILE, ReferenceProfile
from server.drift.service import DriftServicer, TokenGuard
from server.errors import ConfigError
from server.readiness import write_ready_file

log = logging.getLogger("server.drift.sidecar")  # also when run as __main__


def registry_profiles(root: str | Path) -> ProfileLoader:
    """Load `profile.json` attachments from a FileRegistry; None (logged) when absent."""
    registry = FileRegistry(root)

    def load(model: str, version: str) -> ReferenceProfile | None:
        try:
            path = registry.attachment(model, version, PROFILE_FILE)
            return ReferenceProfile.from_json(path.read_bytes())
        except (RegistryError, OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("no reference profile for %s:%s: %s", model, version, exc)
            return None

    return load


class Sidecar(HttpEndpoint):
    """One drift sidecar: the monitor, its gRPC server, HTTP endpoint and periodic evaluation."""

    def __init__(
        self,
        settings: DriftSettings,
        *,
        profiles: ProfileLoader | None = None,
        clock: Clock | None = None,
    ) -> None:
        self.settings = settings
        if profiles is None:
            profiles = registry_profiles(settings.registry) if settings.registry else _no_profiles
        self.actions = AlertActions(settings.alert_webhook, settings.alert_command)
        self.monitor = DriftMonitor(settings, profiles, clock=clock, on_alert=self.actions)
        self.guard = TokenGuard(settings.resolved_token(), clock)
        self.http_host = settings.http_host or settings.host
        self.registry = CollectorRegistry()
        self.registry.register(SidecarCollector(self.monitor, self.actions, self.guard))
        self.grpc_port = 0
        self.http_port = 0
        self._grpc: Any = None
        self._http: asyncio.Server | None = None
        self._tick: asyncio.Task[None] | None = None

    async def start(self) -> None:
        s = self.settings
        self._grpc = grpc.aio.server(
            options=[
                # A second sidecar must fail to bind, not share the port.
                ("grpc.so_reuseport", 0),
                ("grpc.max_receive_message_length", 64 * 1024 * 1024),
                ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
            ]
        )
        pb_grpc.add_DriftServiceServicer_to_server(
            DriftServicer(self.monitor, self.guard), self._grpc
        )
        self.grpc_port = self._grpc.add_insecure_port(f"{s.host}:{s.grpc_port}")
        if self.grpc_port == 0:
            raise OSError(f"cannot bind the drift gRPC port {s.host}:{s.grpc_port}")
        await self._grpc.start()
        self._http = await asyncio.start_server(
            self._serve_http, self.http_host or None, s.http_port
        )
        self.http_port = self._http.sockets[0].getsockname()[1]
        self._tick = asyncio.get_running_loop().create_task(self._ticker(), name="drift-tick")
        log.info(
            "drift sidecar: gRPC on %s:%d, HTTP (metrics, /report) on %s:%d, token %s",
            s.host or "every address",
            self.grpc_port,
            self.http_host or "every address",
            self.http_port,
            "required" if self.guard.enabled else "not set",
        )
        if not self.guard.enabled and not is_loopback(s.host):
            log.warning(
                "drift sidecar: gRPC listens on %s without a token: anyone who reaches it can "
                "stream records and post labels (forged records fire alerts and run "
                "alert_command); set BATCHLINE_DRIFT_TOKEN or --token-file on both ends, or "
                "--host 127.0.0.1",
                s.host or "every address",
            )
        if not self.guard.enabled and not is_loopback(self.http_host):
            log.warning(
                "drift sidecar: HTTP listens on %s without a token: /metrics and /report are "
                "open to read, ?refresh=1 is refused; set BATCHLINE_DRIFT_TOKEN or --token-file "
                "to allow refreshes with the token",
                self.http_host or "every address",
            )
        if s.ready_file:
            write_ready_file(
                s.ready_file,
                {"grpc_port": self.grpc_port, "http_port": self.http_port, "pid": os.getpid()},
            )

    async def stop(self) -> None:
        if self._tick is not None:
            self._tick.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._tick
        if self._grpc is not None:
            await self._grpc.stop(grace=1.0)
        if self._http is not None:
            self._http.close()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._http.wait_closed(), 2.0)
        await self.actions.close()

    async def _ticker(self) -> None:
        period = max(0.05, min(1.0, self.settings.eval_every_s / 4 or 1.0))
        while True:
            await asyncio.sleep(period)
            try:
                self.monitor.tick()
            except Exception:
                log.exception("drift evaluation failed")


def _no_profiles(model: str, version: str) -> ReferenceProfile | None:
    return None


async def run_sidecar(settings: DriftSettings) -> None:
    """Serve until SIGTERM or SIGINT, then stop (exit status 0)."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    sidecar = Sidecar(settings)
    try:
        await sidecar.start()
    except BaseException:
        # A port in use, say: release what did start (the gRPC server) before the error
        # reaches the CLI, so the user sees its one line and no teardown traceback.
        await sidecar.stop()
        raise
    await stop.wait()
    log.info("signal received: stopping the drift sidecar")
    await sidecar.stop()


# -- command line ----------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m server.drift.sidecar [flags]`: the sidecar without a config file."""
    from server.observability.logging import configure

    parser = argparse.ArgumentParser(prog="batchline drift", description=__doc__.split("\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        settings = settings_from_args(args, env=os.environ)
    except ConfigError as exc:
        print(f"batchline drift: {exc}", file=sys.stderr)
        return 2
    configure(settings.log_level)
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        asyncio.run(run_sidecar(settings))
    else:
        uvloop.run(run_sidecar(settings))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
