"""The composition root: builds every concrete part and owns start and stop order.

Start: registry -> models (loaded, warmed up) -> pipeline -> gRPC server -> metrics endpoint ->
ready. Stop (SIGTERM/SIGINT): not ready (ServerReady false, health NOT_SERVING, new inference
calls UNAVAILABLE) -> accepted requests finish within the grace period -> gRPC server stops ->
models unload.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from pathlib import Path
from typing import Any

from registry_client import Registry, RegistryError, open_registry
from registry_client.control import open_control_store
from server import heap
from server.api.admin import AdminGuard, AdminServicer, resolve_admin_token
from server.api.http import RestApp, RestServer
from server.api.server import Health, TlsFiles, build_server
from server.api.servicer import InferenceServicer
from server.breaker import CircuitBreaker
from server.clock import Clock, MonotonicClock
from server.config import Settings
from server.control import ControlPlane, LocalBus
from server.dataplane import DataPlane
from server.drift.producer import DriftProducer
from server.errors import ConfigError
from server.features.sqlite_store import SqliteFeatureStore
from server.features.store import FeatureLookup, FeatureStore
from server.models import ModelManager
from server.observability.endpoint import start_metrics_server
from server.observability.metrics import (
    DriftProducerCollector,
    FeatureMetrics,
    Metrics,
    MirrorCollector,
    PairLogCollector,
)
from server.observability.tracing import Tracing
from server.pipeline import InferencePipeline
from server.readiness import write_ready_file
from server.shadow.log import PairLog
from server.shadow.promotion import PromotionGate, pooled_pairs

log = logging.getLogger(__name__)

# How long arrivals must pause before the gRPC server is stopped during a drain.
QUIET_S = 0.1


def open_feature_store(url: str) -> FeatureStore:
    """A FeatureStore for `url`: redis://, rediss://, unix:// or sqlite:///path."""
    if url.startswith("sqlite:///"):
        return SqliteFeatureStore(url[len("sqlite:///") :])
    from server.features.redis_store import RedisFeatureStore

    return RedisFeatureStore(url)


class App:
    """One server process: its models, batchers, gRPC server and metrics endpoint."""

    def __init__(
        self,
        settings: Settings,
        *,
        clock: Clock | None = None,
        registry: Registry | None = None,
    ) -> None:
        if not settings.models:
            raise ConfigError("no models to serve: pass --model NAME@ALIAS or add [models.NAME]")
        if registry is None and not settings.server.registry:
            raise ConfigError("server.registry: no model registry configured (--registry DIR)")
        self.settings = settings
        self.clock = clock or MonotonicClock()
        try:
            self.registry: Registry = registry or open_registry(
                settings.server.registry, cache_dir=settings.server.registry_cache_dir or None
            )
        except RegistryError as exc:
            raise ConfigError(f"server.registry: {exc}") from exc
        self.metrics = Metrics()
        try:
            self.tracing = Tracing.from_settings(settings.tracing)
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc
        active_tracing = self.tracing if self.tracing.enabled else None
        self._active_tracing = active_tracing
        srv = settings.server
        self.bus = (
            LocalBus(srv.worker_dir, srv.worker_index, srv.worker_count)
            if srv.worker_count > 1 and srv.worker_dir
            else None
        )
        self.pair_log = PairLog(
            srv.shadow_log_max_pairs,
            path=self._pair_log_path(srv.worker_index),
            max_memory_bytes=srv.shadow_log_max_memory_bytes,
        )
        self.models = ModelManager(
            self.registry,
            self.clock,
            self.metrics,
            tracing=active_tracing,
            pair_sink=self.pair_log.append,
            on_retired=self._version_retired,
        )
        self.features: FeatureLookup | None = None
        feature_metrics: FeatureMetrics | None = None
        if settings.server.feature_store:
            store = open_feature_store(settings.server.feature_store)
            feature_metrics = FeatureMetrics(self.metrics.registry, store.description)
            feature_breaker = CircuitBreaker(
                "feature_store",
                settings.server.feature_breaker,
                on_transition=self.metrics.breaker_transition,
            )
            self.metrics.breaker_created(feature_breaker.name)
            self.features = FeatureLookup(
                store,
                timeout_s=settings.server.feature_timeout_ms / 1000,
                max_in_flight=settings.server.feature_max_in_flight,
                max_delay_s=settings.server.feature_max_delay_us / 1e6,
                min_keys=settings.server.feature_min_keys,
                breaker=feature_breaker,
                clock=self.clock.now,
                observer=feature_metrics,
            )
        self.feature_metrics = feature_metrics
        self.drift: DriftProducer | None = None
        if settings.drift.enabled:
            self.drift = DriftProducer.from_settings(settings.drift, clock=self.clock)
            self.metrics.registry.register(DriftProducerCollector(self.drift))
        self.pipeline = InferencePipeline(
            self.models,
            self.clock,
            features=self.features,
            feature_observer=feature_metrics,
            drift=self.drift,
            tracing=active_tracing,
            pair_log=self.pair_log,
        )
        try:
            control_store = open_control_store(self.registry, srv.deployment)
        except RegistryError as exc:
            raise ConfigError(f"server.deployment: {exc}") from exc
        self.control = ControlPlane(
            self.models, control_store, bus=self.bus, poll_interval_s=srv.poll_interval_s
        )
        # The one interface every transport calls.
        self.plane = DataPlane(
            self.pipeline,
            self.models,
            self.clock,
            is_ready=lambda: self._ready,
            control=self.control,
        )
        self.metrics.in_flight.set_function(lambda: float(self.pipeline.in_flight))
        self.metrics.registry.register(MirrorCollector(self.models.mirrors))
        self.metrics.registry.register(PairLogCollector(self.pair_log))
        self.health = Health()
        self.grpc_port = 0
        self.http_port = 0
        self.metrics_port = 0
        self._rest: RestServer | None = None
        self._ready = False
        self._server: Any = None
        self._http: Any = None
        self._stopped = asyncio.Event()
        self._stopping = False
        self._settle_pending = False  # a settle is scheduled for this loop turn's retirements
        self._watcher: asyncio.Task[None] | None = None
        self._gate: asyncio.Task[None] | None = None
        self._control_task: asyncio.Task[None] | None = None
        self._listening = False

    def _pair_log_path(self, index: int) -> str | None:
        """Where worker `index` writes its shadow pairs: `shadow_log` (`.w<index>` with several
        workers, which then always write one, in their folder by default, so the promotion gate
        in worker 0 can judge every worker's pairs)."""
        srv = self.settings.server
        if self.bus is None:
            return srv.shadow_log or None
        base = srv.shadow_log or os.path.join(srv.worker_dir, "pairs.jsonl")
        return f"{base}.w{index}"

    @property
    def ready(self) -> bool:
        return self._ready

    async def start(self) -> None:
        server_settings = self.settings.server
        for model in self.settings.models:
            await self.models.load(await self.control.configure(model))
        await self.control.started()
        admin_guard = AdminGuard(
            resolve_admin_token(server_settings.admin_token, server_settings.admin_token_file),
            server_settings.host,
            insecure=server_settings.admin_insecure,
        )
        servicer = InferenceServicer(
            self.plane,
            self.clock,
            max_tensor_elements=server_settings.max_tensor_elements,
            max_request_id_bytes=server_settings.max_request_id_bytes,
            tracing=self._active_tracing,
        )
        self._server, self.grpc_port = build_server(
            servicer,
            self.health,
            host=server_settings.host,
            port=server_settings.grpc_port,
            max_message_bytes=server_settings.max_message_bytes,
            reuse_port=server_settings.workers > 1,
            admin=AdminServicer(self.plane),
            guard=admin_guard,
            tls=TlsFiles(server_settings.tls_cert, server_settings.tls_key, server_settings.tls_ca)
            if server_settings.tls_cert
            else None,
            max_connection_age_s=server_settings.max_connection_age_s,
            max_connection_age_grace_s=server_settings.max_connection_age_grace_s,
            max_concurrent_rpcs=server_settings.max_concurrent_rpcs,
            max_pending_rpcs=server_settings.max_pending_rpcs,
            transport=server_settings.grpc_transport,
        )
        if self.drift is not None:
            await self.drift.start()
        await self._server.start()
        self._listening = True
        if server_settings.http_port >= 0:
            await self._start_rest(admin_guard)
        if server_settings.metrics_port >= 0:
            self._http, _thread = start_metrics_server(
                server_settings.metrics_port,
                server_settings.metrics_host or server_settings.host,
                self.metrics.registry,
            )
            self.metrics_port = self._http.server_port
        await self.models.start_mirrors()
        gated = any(m.gate_action != "off" for m in self.settings.models)
        if gated and server_settings.worker_index == 0:
            others = [
                Path(p)
                for i in range(1, server_settings.worker_count)
                if (p := self._pair_log_path(i)) is not None
            ]
            gate = PromotionGate(
                self.models,
                self.pair_log,
                contents=pooled_pairs(self.pair_log, others),
                control=self.control,
            )
            self._gate = asyncio.create_task(gate.run(server_settings.gate_interval_s))
        if server_settings.poll_interval_s > 0:
            self._watcher = asyncio.create_task(self.models.watch(server_settings.poll_interval_s))
        if self.control.shared:
            self._control_task = asyncio.create_task(self.control.run())
        self._settle_heap()  # before it says it is ready: the first requests do not wait on it
        self._ready = True
        await self.health.set_serving(True)
        log.info(
            "serving %s on %s:%d (gRPC), HTTP port %d, metrics on port %d",
            ", ".join(f"{m.key.name}:{m.key.version}" for m in self.models.all()),
            server_settings.host,
            self.grpc_port,
            self.http_port,
            self.metrics_port,
        )
        if server_settings.ready_file:
            write_ready_file(
                server_settings.ready_file,
                {
                    "grpc_port": self.grpc_port,
                    "http_port": self.http_port,
                    "metrics_port": self.metrics_port,
                    "pid": os.getpid(),
                },
            )

    def _settle_heap(self) -> None:
        """Keep full garbage-collector passes off the request path (server/heap.py)."""
        if self.settings.server.gc_freeze and not self._stopping:
            heap.settle()

    def _version_retired(self) -> None:
        """One settle for the versions retired in one loop turn (a route change may retire
        several), after the turn: each is a full collection on the loop."""
        if self._settle_pending or not self.settings.server.gc_freeze:
            return
        self._settle_pending = True

        def settle() -> None:
            self._settle_pending = False
            self._settle_heap()

        asyncio.get_running_loop().call_soon(settle)

    async def _start_rest(self, guard: AdminGuard) -> None:
        """The V2 REST binding on the same loop, through the same pipeline as gRPC."""
        srv = self.settings.server
        rest_app = RestApp(
            self.plane,
            self.clock,
            max_tensor_elements=srv.max_tensor_elements,
            max_request_id_bytes=srv.max_request_id_bytes,
            max_body_bytes=srv.max_message_bytes,
            guard=guard,
            tracing=self._active_tracing,
            # Each transport says whether REST must yield turns to it (grpcio) or not (native).
            grpc_busy=self._server.rest_contention(),
        )
        self._rest = RestServer(
            rest_app,
            host=srv.http_host or srv.host,
            port=srv.http_port,
            reuse_port=srv.workers > 1,
            tls_cert=srv.tls_cert,
            tls_key=srv.tls_key,
            tls_ca=srv.tls_ca,
            request_timeout_s=srv.http_request_timeout_s,
            keep_alive_s=srv.http_keep_alive_s,
        )
        self.http_port = await self._rest.start()

    async def stop(self, grace: float | None = None) -> None:
        """Drain and stop; safe to call more than once."""
        if self._stopping:
            await self._stopped.wait()
            return
        self._stopping = True
        grace = self.settings.server.grace_period_s if grace is None else grace
        started = asyncio.get_running_loop().time()
        self._ready = False
        if self._watcher is not None:
            self._watcher.cancel()
        if self._gate is not None:
            self._gate.cancel()
        if self._control_task is not None:
            self._control_task.cancel()
        self.pipeline.stop_accepting()
        await self.health.set_serving(False)
        try:
            await asyncio.wait_for(self._drain(), timeout=grace)
        except TimeoutError:
            log.warning(
                "grace period of %.1fs ended with %d requests unanswered",
                grace,
                self.pipeline.in_flight,
            )
        # gRPC may hold calls it received but has not handed to a handler yet; stopping now
        # would cancel them. Keep answering (UNAVAILABLE, shutting down) until arrivals have
        # been quiet for a moment, within what is left of the grace period.
        loop = asyncio.get_running_loop()
        until = started + grace
        while self._listening and loop.time() < until:
            if self.clock.now() - self.plane.last_call >= QUIET_S:
                break
            await asyncio.sleep(QUIET_S / 5)
        if self._server is not None:
            await self._server.stop(grace=0.5)
        if self._rest is not None:
            await self._rest.stop(max(0.5, until - loop.time()))
        await self.models.stop_mirrors()
        await asyncio.get_running_loop().run_in_executor(None, self.tracing.shutdown)
        if self.drift is not None:
            await self.drift.stop(self.settings.drift.flush_timeout_s)
        self.pair_log.close()
        self.models.close()
        if self.features is not None:
            await self.features.close()
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
        if self.settings.server.gc_freeze:
            heap.release()  # what it froze is the collector's again (an embedding process)
        log.info("stopped")
        self._stopped.set()

    async def _drain(self) -> None:
        await self.pipeline.drain()
        await self.models.drain()

    async def run_until_signal(self) -> None:
        """Start, serve until SIGTERM or SIGINT, then drain and stop."""
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await self.start()
        await stop.wait()
        log.info("signal received: draining (grace %.1fs)", self.settings.server.grace_period_s)
        await self.stop()
