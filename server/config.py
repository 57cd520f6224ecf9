"""Typed settings: batchline.toml, then BATCHLINE_* environment variables, then flags.

Every setting has one home here. An unknown key or a bad value stops start-up with a ConfigError
that names the key, e.g. `models.churn.max_batch_size: expected an integer >= 1, got 0`.

    [server]
    host = "0.0.0.0"
    grpc_port = 8001
    http_port = 8000             # the V2 REST binding; 0: any free port; -1: off
    metrics_port = 8002          # 0: any free port; -1: no metrics endpoint
    registry = "demo-registry"   # a file registry folder
    workers = 1
    grace_period_s = 10.0
    max_message_bytes = 67108864
    max_tensor_elements = 4194304
    max_request_id_bytes = 256   # longer request ids: INVALID_ARGUMENT

    [model_defaults]             # applied to every model, overridden per model
    max_batch_size = 64

    [models.churn]
    ref = "churn@production"
    max_queue_delay_us = 500
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from server.breaker import BreakerConfig
from server.drift import DriftSettings, settings_from_env
from server.drift import check_settings as check_drift
from server.errors import ConfigError
from server.observability.tracing import TracingSettings
from server.shadow.gate import GateConfig


@dataclass(frozen=True)
class ModelSettings:
    """How one served model is loaded, batched and run."""

    name: str
    ref: str
    # Dynamic batching (Triton's names where they exist).
    dynamic_batching: bool = True
    max_batch_size: int = 64
    max_queue_delay_us: int = 2000
    preferred_batch_sizes: tuple[int, ...] = ()
    # Rows allowed to wait; 0 means unbounded (only when asked for).
    max_queue_size: int = 2048
    # Batches that may run at once in the executor (ONNX Runtime releases the GIL).
    instances: int = 1
    # "auto" (inline when a batch-1 run is cheaper than a thread hop), "inline" or "executor".
    execution: str = "auto"
    intra_op_threads: int = 1
    inter_op_threads: int = 1
    providers: tuple[str, ...] = ("CPUExecutionProvider",)
    # Requests accepted and not yet answered, per model (Envoy's max_requests); 0: no cap.
    max_in_flight: int = 4096
    # An inference taking longer than this counts as a failure for the breaker; 0: none.
    timeout_ms: float = 0.0
    # The circuit breaker around this model's inference ([models.NAME.breaker], resilience4j
    # names: failure_rate_threshold, slow_call_rate_threshold, slow_call_duration_s,
    # sliding_window_type, sliding_window_size, minimum_number_of_calls,
    # wait_duration_in_open_s, permitted_calls_in_half_open, max_wait_in_half_open_s).
    breaker: BreakerConfig = field(default_factory=BreakerConfig)
    # What answers while the breaker is open: "unavailable", "static" (fallback_outputs, per
    # row) or "previous" (the version served before the last swap, or fallback_ref at start).
    fallback: str = "unavailable"
    fallback_outputs: dict[str, Any] = field(default_factory=dict)
    fallback_ref: str = ""
    # Traffic split: `canary` (a version) answers `canary_percent` of the requests that name no
    # version, sticky by entity id (else request id); `shadows` (versions) get mirrored copies
    # of `shadow_sample_percent` of requests, after the caller has its answer.
    canary: str = ""
    canary_percent: float = 0.0
    shadows: tuple[str, ...] = ()
    shadow_sample_percent: float = 100.0
    shadow_queue_size: int = 256
    shadow_concurrency: int = 1
    # Mirrored work is shed while the primary's queue holds more than this share of its bound.
    shadow_shed_above: float = 0.5
    # ... or while the event loop's thread is busier than this share of the time (no spare
    # CPU for mirrored work).
    shadow_max_loop_busy: float = 0.8
    # The automatic promotion gate over shadow pairs: "off", "log" (decide and log) or "apply"
    # (move the alias to a passing shadow, drop a failing one). [models.NAME.gate] holds
    # min_requests, min_agreement, max_mean_abs_diff, max_error_rate.
    gate_action: str = "off"
    gate: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ServerSettings:
    host: str = "0.0.0.0"
    grpc_port: int = 8001
    # The Open Inference Protocol's HTTP/REST binding (Triton's port 8000), same process and
    # event loop as gRPC, same TLS files; 0: any free port; -1: off.
    http_port: int = 8000
    # Where it listens; empty: `host`.
    http_host: str = ""
    # A request must arrive whole (headers and body) within this many seconds of its first
    # byte, else 408 and the connection closes; idle keep-alive connections close after
    # http_keep_alive_s.
    http_request_timeout_s: float = 60.0
    http_keep_alive_s: float = 75.0
    metrics_port: int = 8002
    # Where the metrics endpoint listens; empty: `host`. (--workers binds theirs to loopback.)
    metrics_host: str = ""
    registry: str = ""
    # Where artifacts fetched from a remote registry (MLflow) are cached; empty: the user cache.
    registry_cache_dir: str = ""
    workers: int = 1
    grace_period_s: float = 10.0
    max_message_bytes: int = 64 * 1024 * 1024
    max_tensor_elements: int = 4 * 1024 * 1024
    # A request id is kept by the drift queue, the shadow pair log and the sidecar's label
    # memory: bounded per id here so those stay bounded in bytes, not only in count.
    max_request_id_bytes: int = 256
    ready_file: str = ""
    log_level: str = "info"
    # "text" (one readable line per event), "json" (JSON lines, for log shippers) or "auto":
    # text when stderr is a terminal, JSON otherwise.
    log_format: str = "auto"
    # Seconds between checks of each served alias in the registry; 0 turns watching off.
    poll_interval_s: float = 2.0
    # Bearer token for admin RPCs (AdminService, ModelStatus, RepositoryModelLoad/Unload).
    # Prefer BATCHLINE_ADMIN_TOKEN or admin_token_file: a flag shows in /proc/PID/cmdline.
    # With no token, admin RPCs answer only on a loopback host, unless admin_insecure = true.
    admin_token: str = ""
    admin_token_file: str = ""
    admin_insecure: bool = False
    # Online feature store for entity-keyed requests: redis://, rediss://, unix:// or
    # sqlite:///path; empty: requests must carry feature tensors.
    feature_store: str = ""
    feature_timeout_ms: float = 20.0
    # Round trips one store may have in flight; lookups arriving meanwhile share the next one.
    feature_max_in_flight: int = 1
    # Under concurrent traffic a round trip waits up to this long for company (eager when
    # idle), or until feature_min_keys keys wait, or the usual crowd of lookups is back.
    feature_max_delay_us: int = 5000
    feature_min_keys: int = 16
    # The breaker around feature-store lookups ([server.feature_breaker], same keys as a
    # model's breaker); while open, lookups answer UNAVAILABLE or the view's defaults.
    feature_breaker: BreakerConfig = field(default_factory=BreakerConfig)
    # TLS on the gRPC port: certificate and key (PEM files); with tls_ca, clients must present a
    # certificate signed by it (mutual TLS).
    tls_cert: str = ""
    tls_key: str = ""
    tls_ca: str = ""
    # Close client connections after this many seconds (0: never) so clients reconnect and
    # spread over new replicas after a scale-out; in-flight calls get max_connection_age_grace_s.
    # RPCs the gRPC server runs in Python at once (0: no limit); grpc.aio refuses the rest with
    # RESOURCE_EXHAUSTED before our handler. Calls still wait inside gRPC's core until the event
    # loop takes them, so under overload these refusals can come late (see max_pending_rpcs).
    max_concurrent_rpcs: int = 0
    # Pending calls gRPC's core keeps for the server (arrived, not yet taken by Python); beyond
    # it the core refuses calls itself, at random up to twice it and always past that, without
    # running any Python: the cheapest, fastest refusal a Python server can make. gRPC's core
    # answers these CANCELLED (not RESOURCE_EXHAUSTED; gRPC offers no choice). 0: gRPC's
    # defaults (1000 / 3000).
    max_pending_rpcs: int = 0
    max_connection_age_s: float = 0.0
    max_connection_age_grace_s: float = 30.0
    # Where shadow pairs go besides memory (JSON lines, rotated); read by `batchline shadow report`.
    shadow_log: str = ""
    shadow_log_max_pairs: int = 10000
    # The pairs kept in memory are bounded in bytes too (ids, per-row scores and labels).
    shadow_log_max_memory_bytes: int = 32 * 1024 * 1024
    # Seconds between promotion-gate checks (models with gate_action other than "off").
    gate_interval_s: float = 10.0
    # The name under which this deployment's control state (routes, pinned refs) lives in the
    # registry beside the aliases; every worker and replica of one deployment shares it, two
    # deployments on one registry (staging, production) must not.
    deployment: str = "default"
    # Set by `--workers N`'s parent for each worker (not configuration): this worker's index,
    # how many there are, and the folder they coordinate through (server/control.LocalBus).
    worker_index: int = 0
    worker_count: int = 1
    worker_dir: str = ""


@dataclass(frozen=True)
class Settings:
    server: ServerSettings = field(default_factory=ServerSettings)
    models: tuple[ModelSettings, ...] = ()
    # The drift producer in the server and the sidecar process ([drift]; server/drift).
    drift: DriftSettings = field(default_factory=DriftSettings)
    # Which requests are traced and where spans go ([tracing]; server/observability/tracing).
    tracing: TracingSettings = field(default_factory=TracingSettings)


_MODEL_KEYS = {f.name: f for f in fields(ModelSettings) if f.name != "name"}
_SERVER_KEYS = {f.name: f for f in fields(ServerSettings)}
_DRIFT_KEYS = {f.name: f for f in fields(DriftSettings)}
_TRACING_KEYS = {f.name: f for f in fields(TracingSettings)}
_ENV = {
    "BATCHLINE_HOST": "host",
    "BATCHLINE_GRPC_PORT": "grpc_port",
    "BATCHLINE_HTTP_PORT": "http_port",
    "BATCHLINE_METRICS_PORT": "metrics_port",
    "BATCHLINE_REGISTRY": "registry",
    "BATCHLINE_WORKERS": "workers",
    "BATCHLINE_GRACE_PERIOD_S": "grace_period_s",
    "BATCHLINE_LOG_LEVEL": "log_level",
    "BATCHLINE_LOG_FORMAT": "log_format",
    "BATCHLINE_POLL_INTERVAL_S": "poll_interval_s",
    "BATCHLINE_ADMIN_TOKEN": "admin_token",
    "BATCHLINE_ADMIN_TOKEN_FILE": "admin_token_file",
    "BATCHLINE_FEATURE_STORE": "feature_store",
    "BATCHLINE_DEPLOYMENT": "deployment",
}


def _coerce(key: str, kind: Any, value: Any) -> Any:
    """Check and convert one value to the declared type of its field."""
    if kind in ("int", int):
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, str) and value.strip().removeprefix("-").isdecimal():
                return int(value)
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if kind in ("float", float):
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if not isinstance(value, int | float):
            try:
                return float(value)
            except (TypeError, ValueError):
                raise ConfigError(f"{key}: expected a number, got {value!r}") from None
        return float(value)
    if kind in ("bool", bool):
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
            return value.lower() in ("true", "1")
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if kind in ("str", str):
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    if kind == "tuple[int, ...]":
        if not isinstance(value, list | tuple) or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in value
        ):
            raise ConfigError(f"{key}: expected a list of integers, got {value!r}")
        return tuple(value)
    if kind == "BreakerConfig":
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a table")
        try:
            return BreakerConfig.from_mapping(key, value)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    if kind == "dict[str, Any]":
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a table")
        return dict(value)
    if kind == "tuple[str, ...]":
        if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{key}: expected a list of strings, got {value!r}")
        return tuple(value)
    raise ConfigError(f"{key}: unsupported setting type {kind}")  # pragma: no cover


def _check_model(key: str, m: ModelSettings) -> None:
    def at_least(name: str, value: int, low: int) -> None:
        if value < low:
            raise ConfigError(f"{key}.{name}: expected an integer >= {low}, got {value}")

    at_least("max_batch_size", m.max_batch_size, 1)
    at_least("max_queue_delay_us", m.max_queue_delay_us, 0)
    at_least("max_queue_size", m.max_queue_size, 0)
    at_least("instances", m.instances, 1)
    at_least("intra_op_threads", m.intra_op_threads, 0)
    at_least("inter_op_threads", m.inter_op_threads, 0)
    at_least("max_in_flight", m.max_in_flight, 0)
    if m.timeout_ms < 0:
        raise ConfigError(f"{key}.timeout_ms: expected >= 0, got {m.timeout_ms}")
    if m.fallback not in ("unavailable", "static", "previous"):
        raise ConfigError(
            f"{key}.fallback: expected unavailable, static or previous, got {m.fallback!r}"
        )
    if m.fallback == "static" and not m.fallback_outputs:
        raise ConfigError(f"{key}.fallback_outputs: fallback = static needs the outputs to answer")
    if m.fallback_ref and "@" not in m.fallback_ref:
        raise ConfigError(
            f"{key}.fallback_ref: expected NAME@ALIAS or NAME@VERSION, got {m.fallback_ref!r}"
        )
    if m.canary_percent and not m.canary:
        raise ConfigError(f"{key}.canary_percent: set {key}.canary (a version) too")
    if not 0 <= m.canary_percent <= 100:
        raise ConfigError(f"{key}.canary_percent: expected 0..100, got {m.canary_percent}")
    if not 0 < m.shadow_sample_percent <= 100:
        raise ConfigError(
            f"{key}.shadow_sample_percent: expected (0, 100], got {m.shadow_sample_percent}"
        )
    at_least("shadow_queue_size", m.shadow_queue_size, 1)
    if m.gate_action not in ("off", "log", "apply"):
        raise ConfigError(f"{key}.gate_action: expected off, log or apply, got {m.gate_action!r}")
    try:
        GateConfig.from_dict(m.gate)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{key}.gate.{exc}") from None
    at_least("shadow_concurrency", m.shadow_concurrency, 1)
    if not 0 < m.shadow_max_loop_busy <= 1.5:
        raise ConfigError(
            f"{key}.shadow_max_loop_busy: expected (0, 1.5], got {m.shadow_max_loop_busy}"
        )
    if not 0 < m.shadow_shed_above <= 1:
        raise ConfigError(f"{key}.shadow_shed_above: expected (0, 1], got {m.shadow_shed_above}")
    if m.execution not in ("auto", "inline", "executor"):
        raise ConfigError(
            f"{key}.execution: expected auto, inline or executor, got {m.execution!r}"
        )
    for size in m.preferred_batch_sizes:
        if not 1 <= size <= m.max_batch_size:
            raise ConfigError(
                f"{key}.preferred_batch_sizes: {size} is outside 1..max_batch_size ({m.max_batch_size})"
            )
    if "@" not in m.ref or not m.ref.split("@", 1)[0]:
        raise ConfigError(f"{key}.ref: expected NAME@ALIAS or NAME@VERSION, got {m.ref!r}")


def _check_server(s: ServerSettings) -> None:
    for name in ("grpc_port", "http_port", "metrics_port"):
        value = getattr(s, name)
        low = -1 if name in ("http_port", "metrics_port") else 0
        if not low <= value <= 65535:
            raise ConfigError(f"server.{name}: expected a port {low}..65535, got {value}")
    if s.workers < 1:
        raise ConfigError(f"server.workers: expected an integer >= 1, got {s.workers}")
    if s.workers > 1 and s.grpc_port == 0:
        raise ConfigError(
            "server.workers: several workers share one port; set server.grpc_port (not 0)"
        )
    if s.workers > 1 and s.http_port == 0:
        raise ConfigError(
            "server.workers: several workers share one port; set server.http_port (not 0; "
            "-1 turns HTTP off)"
        )
    if s.http_port > 0 and s.http_port in (s.grpc_port, s.metrics_port):
        raise ConfigError(
            f"server.http_port: {s.http_port} is also the gRPC or metrics port; pick another"
        )
    for name in ("http_request_timeout_s", "http_keep_alive_s"):
        if getattr(s, name) <= 0:
            raise ConfigError(f"server.{name}: expected > 0, got {getattr(s, name)}")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}", s.deployment):
        raise ConfigError(
            f"server.deployment: expected a name of letters, digits, '_', '.', '-' (up to 63), "
            f"got {s.deployment!r}"
        )
    if s.grace_period_s < 0:
        raise ConfigError(f"server.grace_period_s: expected >= 0, got {s.grace_period_s}")
    if s.max_message_bytes < 1024:
        raise ConfigError(f"server.max_message_bytes: expected >= 1024, got {s.max_message_bytes}")
    if s.max_tensor_elements < 1:
        raise ConfigError(f"server.max_tensor_elements: expected >= 1, got {s.max_tensor_elements}")
    if s.admin_token and s.admin_token_file:
        raise ConfigError("server.admin_token_file: give the admin token or its file, not both")
    if s.admin_token_file:
        try:
            token = Path(s.admin_token_file).read_text().strip()
        except OSError as exc:
            raise ConfigError(
                f"server.admin_token_file: cannot read {s.admin_token_file}: {exc.strerror}"
            ) from None
        if not token:
            raise ConfigError(f"server.admin_token_file: {s.admin_token_file} is empty")
    if s.shadow_log_max_pairs < 1:
        raise ConfigError(
            f"server.shadow_log_max_pairs: expected >= 1, got {s.shadow_log_max_pairs}"
        )
    if s.shadow_log_max_memory_bytes < 1:
        raise ConfigError(
            "server.shadow_log_max_memory_bytes: expected >= 1, got "
            f"{s.shadow_log_max_memory_bytes}"
        )
    if s.max_request_id_bytes < 1:
        raise ConfigError(
            f"server.max_request_id_bytes: expected >= 1, got {s.max_request_id_bytes}"
        )
    if s.feature_timeout_ms <= 0:
        raise ConfigError(f"server.feature_timeout_ms: expected > 0, got {s.feature_timeout_ms}")
    if s.max_pending_rpcs < 0:
        raise ConfigError(f"server.max_pending_rpcs: expected >= 0, got {s.max_pending_rpcs}")
    if s.feature_min_keys < 1:
        raise ConfigError(f"server.feature_min_keys: expected >= 1, got {s.feature_min_keys}")
    if s.feature_max_delay_us < 0:
        raise ConfigError(
            f"server.feature_max_delay_us: expected >= 0, got {s.feature_max_delay_us}"
        )
    if s.feature_max_in_flight < 1:
        raise ConfigError(
            f"server.feature_max_in_flight: expected >= 1, got {s.feature_max_in_flight}"
        )
    if s.feature_store and not s.feature_store.startswith(
        ("redis://", "rediss://", "unix://", "sqlite:///")
    ):
        raise ConfigError(
            f"server.feature_store: expected redis://, rediss://, unix:// or sqlite:///path, got {s.feature_store!r}"
        )
    if bool(s.tls_cert) != bool(s.tls_key):
        raise ConfigError("server.tls_cert and server.tls_key: set both or neither")
    if s.tls_ca and not s.tls_cert:
        raise ConfigError("server.tls_ca: mutual TLS needs server.tls_cert and server.tls_key too")
    for name in ("tls_cert", "tls_key", "tls_ca"):
        value = getattr(s, name)
        if value and not Path(value).is_file():
            raise ConfigError(f"server.{name}: {value} is not a readable file")
    if s.poll_interval_s < 0:
        raise ConfigError(f"server.poll_interval_s: expected >= 0, got {s.poll_interval_s}")
    if s.log_format not in ("auto", "text", "json"):
        raise ConfigError(f"server.log_format: expected auto, text or json, got {s.log_format!r}")
    if s.log_level.lower() not in ("debug", "info", "warning", "error"):
        raise ConfigError(
            f"server.log_level: expected debug, info, warning or error, got {s.log_level!r}"
        )


def _apply(prefix: str, known: Mapping[str, Any], table: Mapping[str, Any]) -> dict[str, Any]:
    if not isinstance(table, Mapping):
        raise ConfigError(f"{prefix}: expected a table, got {table!r}")
    out = {}
    for key, value in table.items():
        spec = known.get(key)
        if spec is None:
            raise ConfigError(f"unknown key {prefix}.{key} (known: {', '.join(sorted(known))})")
        out[key] = _coerce(f"{prefix}.{key}", spec.type, value)
    return out


def load_settings(
    path: str | Path | None = None,
    *,
    env: Mapping[str, str] | None = None,
    server_overrides: Mapping[str, Any] | None = None,
    model_refs: tuple[str, ...] = (),
    model_overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Build Settings from a TOML file, the environment and flags (later wins).

    `model_refs` (from `--model NAME@ALIAS`) add models or replace their ref; `model_overrides`
    apply to every model (flags such as --max-batch-size).
    """
    data: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path, "rb") as fh:
                data = tomllib.load(fh)
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    unknown = set(data) - {"server", "model_defaults", "models", "drift", "tracing"}
    if unknown:
        raise ConfigError(
            f"unknown key {sorted(unknown)[0]} "
            "(known: drift, model_defaults, models, server, tracing)"
        )
    try:
        tracing = TracingSettings(**_apply("tracing", _TRACING_KEYS, data.get("tracing", {})))
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    drift = DriftSettings(**_apply("drift", _DRIFT_KEYS, data.get("drift", {})))
    # BATCHLINE_DRIFT_TOKEN / BATCHLINE_DRIFT_TOKEN_FILE (server/drift: both ends read them).
    drift = settings_from_env(drift, env or {})
    check_drift(drift)

    server_values = _apply("server", _SERVER_KEYS, data.get("server", {}))
    for var, key in _ENV.items():
        if env is not None and var in env:
            server_values[key] = _coerce(var, _SERVER_KEYS[key].type, env[var])
    for key, value in (server_overrides or {}).items():
        if value is not None:
            server_values[key] = _coerce(
                f"--{key.replace('_', '-')}", _SERVER_KEYS[key].type, value
            )
    server = ServerSettings(**server_values)
    _check_server(server)

    defaults = _apply("model_defaults", _MODEL_KEYS, data.get("model_defaults", {}))
    tables: dict[str, dict[str, Any]] = {}
    model_tables = data.get("models", {})
    if not isinstance(model_tables, Mapping):
        raise ConfigError(f"models: expected a table of [models.NAME] tables, got {model_tables!r}")
    for name, table in model_tables.items():
        if not isinstance(table, dict):
            raise ConfigError(f"models.{name}: expected a table")
        tables[name] = _apply(f"models.{name}", _MODEL_KEYS, table)
    given: dict[str, str] = {}
    for ref in model_refs:
        name = ref.split("@", 1)[0]
        if "@" not in ref or not name:
            raise ConfigError(f"--model: expected NAME@ALIAS or NAME@VERSION, got {ref!r}")
        if given.get(name, ref) != ref:
            # One version per model name answers by default; a second one is a route.
            raise ConfigError(
                f"--model {given[name]} and --model {ref} both serve model {name!r}: give one; "
                f"to run another version beside it use --canary VERSION --canary-percent P or "
                f"--shadow VERSION"
            )
        given[name] = ref
        tables.setdefault(name, {})["ref"] = ref
    models = []
    for name, values in tables.items():
        merged = {**defaults, **values}
        merged.setdefault("ref", f"{name}@production")
        for key, value in (model_overrides or {}).items():
            if value is not None:
                merged[key] = _coerce(f"--{key.replace('_', '-')}", _MODEL_KEYS[key].type, value)
        model = ModelSettings(name=name, **merged)
        _check_model(f"models.{name}", model)
        models.append(model)
    return Settings(server=server, models=tuple(models), drift=drift, tracing=tracing)
