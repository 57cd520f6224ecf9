"""`[server]`: the process (ports, limits, TLS, admin, logging), its feature store and its
shadow pair log."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal, Self

from pydantic import Field, model_validator
from pydantic.dataclasses import dataclass

from server.config.breaker import BreakerConfig
from server.config.validation import (
    SECTION,
    Bool,
    Float,
    Int,
    OptionalPort,
    Port,
    Problems,
    Str,
    section,
)

_AtLeast0 = Annotated[Int, Field(ge=0)]
_AtLeast1 = Annotated[Int, Field(ge=1)]
_Seconds = Annotated[Float, Field(ge=0)]
_Positive = Annotated[Float, Field(gt=0)]
_DEPLOYMENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
_FEATURE_STORES = ("redis://", "rediss://", "unix://", "sqlite:///")
_LOG_LEVELS = ("debug", "info", "warning", "error")


@section("server")
@dataclass(frozen=True, config=SECTION)
class ServerSettings:
    """`[server]`. Construction checks every value, their combinations, and that the files
    named (TLS, admin token) can be read; the ConfigError names each key that is wrong."""

    host: Str = "0.0.0.0"
    grpc_port: Port = 8001
    # Who speaks gRPC on grpc_port: "native" (HTTP/2 parsed on the event loop itself,
    # server/api/h2/: no gRPC core threads or completion queue between the socket and the
    # handlers, 2.7-3.5x less CPU per unary call) or "grpcio" (grpc.aio on gRPC core). Same
    # services, handlers, limits and TLS either way (README "gRPC transports");
    # max_pending_rpcs is grpcio's alone (native starts every call it accepts at once).
    grpc_transport: Literal["grpcio", "native"] = "native"
    # The Open Inference Protocol's HTTP/REST binding (Triton's port 8000), same process and
    # event loop as gRPC, same TLS files; 0: any free port; -1: off.
    http_port: OptionalPort = 8000
    # Where it listens; empty: `host`.
    http_host: Str = ""
    # A request must arrive whole (headers and body) within this many seconds of its first
    # byte, else 408 and the connection closes; idle keep-alive connections close after
    # http_keep_alive_s.
    http_request_timeout_s: _Positive = 60.0
    http_keep_alive_s: _Positive = 75.0
    metrics_port: OptionalPort = 8002
    # Where the metrics endpoint listens; empty: `host`. (--workers binds theirs to loopback.)
    metrics_host: Str = ""
    registry: Str = ""
    # Where artifacts fetched from a remote registry (MLflow) are cached; empty: the user cache.
    registry_cache_dir: Str = ""
    workers: _AtLeast1 = 1
    grace_period_s: _Seconds = 10.0
    max_message_bytes: Annotated[Int, Field(ge=1024)] = 64 * 1024 * 1024
    max_tensor_elements: _AtLeast1 = 4 * 1024 * 1024
    # A request id is kept by the drift queue, the shadow pair log and the sidecar's label
    # memory: bounded per id here so those stay bounded in bytes, not only in count.
    max_request_id_bytes: _AtLeast1 = 256
    ready_file: Str = ""
    log_level: Str = "info"
    # "text" (one readable line per event), "json" (JSON lines, for log shippers) or "auto":
    # text when stderr is a terminal, JSON otherwise.
    log_format: Literal["auto", "text", "json"] = "auto"
    # Freeze what the process holds once its models are loaded (and after each retired
    # version), so the garbage collector's full passes walk only what was made since: a full
    # pass over everything stalled the event loop ~50 ms about once a second under load
    # (server/heap.py). Off: CPython's collector as it comes.
    gc_freeze: Bool = True
    # Seconds between checks of each served alias in the registry; 0 turns watching off.
    poll_interval_s: _Seconds = 2.0
    # Bearer token for admin RPCs (AdminService, ModelStatus, RepositoryModelLoad/Unload).
    # Prefer BATCHLINE_ADMIN_TOKEN or admin_token_file: a flag shows in /proc/PID/cmdline.
    # With no token, admin RPCs answer only on a loopback host, unless admin_insecure = true.
    admin_token: Str = ""
    admin_token_file: Str = ""
    admin_insecure: Bool = False
    # Online feature store for entity-keyed requests: redis://, rediss://, unix:// or
    # sqlite:///path; empty: requests must carry feature tensors.
    feature_store: Str = ""
    feature_timeout_ms: _Positive = 20.0
    # Round trips one store may have in flight; lookups arriving meanwhile share the next one.
    feature_max_in_flight: _AtLeast1 = 1
    # Under concurrent traffic a round trip waits up to this long for company (eager when
    # idle), or until feature_min_keys keys wait, or the usual crowd of lookups is back.
    feature_max_delay_us: _AtLeast0 = 5000
    feature_min_keys: _AtLeast1 = 16
    # The breaker around feature-store lookups ([server.feature_breaker], same keys as a
    # model's breaker); while open, lookups answer UNAVAILABLE or the view's defaults.
    feature_breaker: BreakerConfig = Field(default_factory=BreakerConfig)
    # TLS on the gRPC port: certificate and key (PEM files); with tls_ca, clients must present a
    # certificate signed by it (mutual TLS).
    tls_cert: Str = ""
    tls_key: Str = ""
    tls_ca: Str = ""
    # RPCs the gRPC server runs in Python at once (0: no limit); grpc.aio refuses the rest with
    # RESOURCE_EXHAUSTED before our handler. Calls still wait inside gRPC's core until the event
    # loop takes them, so under overload these refusals can come late (see max_pending_rpcs).
    max_concurrent_rpcs: _AtLeast0 = 0
    # Pending calls gRPC's core keeps for the server (arrived, not yet taken by Python); beyond
    # it the core refuses calls itself, at random up to twice it and always past that, without
    # running any Python: the cheapest, fastest refusal a Python server can make. gRPC's core
    # answers these CANCELLED (not RESOURCE_EXHAUSTED; gRPC offers no choice). 0: gRPC's
    # defaults (1000 / 3000).
    max_pending_rpcs: _AtLeast0 = 0
    # Close client connections after this many seconds (0: never) so clients reconnect and
    # spread over new replicas after a scale-out; in-flight calls get max_connection_age_grace_s.
    max_connection_age_s: _Seconds = 0.0
    max_connection_age_grace_s: _Seconds = 30.0
    # Where shadow pairs go besides memory (JSON lines, rotated); read by `batchline shadow report`.
    shadow_log: Str = ""
    shadow_log_max_pairs: _AtLeast1 = 10000
    # The pairs kept in memory are bounded in bytes too (ids, per-row scores and labels).
    shadow_log_max_memory_bytes: _AtLeast1 = 32 * 1024 * 1024
    # Seconds between promotion-gate checks (models with gate_action other than "off").
    gate_interval_s: _Positive = 10.0
    # The name under which this deployment's control state (routes, pinned refs) lives in the
    # registry beside the aliases; every worker and replica of one deployment shares it, two
    # deployments on one registry (staging, production) must not.
    deployment: Str = "default"
    # Set by `--workers N`'s parent for each worker (not configuration): this worker's index,
    # how many there are, and the folder they coordinate through (server/control.LocalBus).
    worker_index: _AtLeast0 = 0
    worker_count: _AtLeast1 = 1
    worker_dir: Str = ""

    @model_validator(mode="after")
    def _check(self) -> Self:
        problems = Problems()
        if self.workers > 1 and self.grpc_port == 0:
            problems.add("workers", "several workers share one port; set {at}grpc_port (not 0)")
        if self.workers > 1 and self.http_port == 0:
            problems.add(
                "workers",
                "several workers share one port; set {at}http_port (not 0; -1 turns HTTP off)",
            )
        if self.http_port > 0 and self.http_port in (self.grpc_port, self.metrics_port):
            problems.add(
                "http_port", f"{self.http_port} is also the gRPC or metrics port; pick another"
            )
        if self.grpc_transport == "native" and self.max_pending_rpcs > 0:
            problems.add(
                "max_pending_rpcs",
                'caps gRPC core\'s queue, which only grpc_transport = "grpcio" has (the native '
                "transport starts each call at once: cap them with {at}max_concurrent_rpcs, "
                "or a model's max_queue_size)",
            )
        if not _DEPLOYMENT.fullmatch(self.deployment):
            problems.add(
                "deployment",
                "expected a name of letters, digits, '_', '.', '-' (up to 63), "
                f"got {self.deployment!r}",
            )
        if self.log_level.lower() not in _LOG_LEVELS:
            problems.add(
                "log_level", f"expected debug, info, warning or error, got {self.log_level!r}"
            )
        if self.feature_store and not self.feature_store.startswith(_FEATURE_STORES):
            problems.add(
                "feature_store",
                "expected redis://, rediss://, unix:// or sqlite:///path, "
                f"got {self.feature_store!r}",
            )
        self._check_files(problems)
        problems.check()
        return self

    def _check_files(self, problems: Problems) -> None:
        if self.admin_token and self.admin_token_file:
            problems.add("admin_token_file", "give the admin token or its file, not both")
        elif self.admin_token_file:
            try:
                token = Path(self.admin_token_file).read_text().strip()
            except OSError as exc:
                problems.add(
                    "admin_token_file", f"cannot read {self.admin_token_file}: {exc.strerror}"
                )
            else:
                if not token:
                    problems.add("admin_token_file", f"{self.admin_token_file} is empty")
        if bool(self.tls_cert) != bool(self.tls_key):
            problems.add("tls_cert and {at}tls_key", "set both or neither")
        if self.tls_ca and not self.tls_cert:
            problems.add("tls_ca", "mutual TLS needs {at}tls_cert and {at}tls_key too")
        for name in ("tls_cert", "tls_key", "tls_ca"):
            value = getattr(self, name)
            if value and not Path(value).is_file():
                problems.add(name, f"{value} is not a readable file")
