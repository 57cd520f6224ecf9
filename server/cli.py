"""The `batchline` command: argv -> Settings -> App for `serve`, and the tools around it.

Every error a user can cause prints one line on stderr naming the flag, file or URL and what to
do, and exits non-zero (2: a mistake in what was asked; 1: what was asked failed, e.g. a
server refused it); `--debug`, anywhere on the command line, shows the traceback too. Output
cut short by a closed pipe (`| head`) ends quietly.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import contextlib
import errno
import multiprocessing
import os
import shutil
import signal
import socket
import sys
import tempfile
import traceback
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from registry_client import cli as registry_cli
from registry_client.errors import RegistryError
from server import admin_cli
from server import drift as drift_settings
from server.config import ServerSettings, Settings, load_settings
from server.drift import report as drift_report
from server.errors import ConfigError, ServingError
from server.shadow import cli as shadow_report

DESCRIPTION = """batchline serves ONNX models over gRPC, speaking the Open Inference Protocol (KServe V2): a
dynamic batcher in front of onnxruntime, models resolved by alias from a file registry or MLflow,
online features from Redis or SQLite, canary and shadow routes, a drift sidecar, Prometheus
metrics. The same command manages the registry and a running server.

first steps:
  batchline models build-demo --registry demo-registry
  batchline serve --registry demo-registry --model churn@production
  batchline health --address 127.0.0.1:8001
  batchline admin status --address 127.0.0.1:8001

your own model (an ONNX file, e.g. from skl2onnx or torch.onnx):
  batchline registry register churn model.onnx --registry REG --alias production
  batchline serve --registry REG --model churn@production
"""
EPILOG = "Each command has its own --help. --debug (anywhere) shows tracebacks of errors."
INSTALL_TRAIN = "pip install 'batchline[train]'"
# What the demo models need beyond serving: the "train" extra.
_TRAIN_MODULES = ("sklearn", "skl2onnx", "onnx")


def _run(coro: object) -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        asyncio.run(coro)  # type: ignore[arg-type]
    else:
        uvloop.run(coro)  # type: ignore[arg-type]


def _configure_logging(level: str, format: str = "auto") -> None:
    from server.observability.logging import configure

    configure(level, format)


def _serve_one(settings: Settings) -> None:
    from server.app import App

    _configure_logging(settings.server.log_level, settings.server.log_format)
    _run(_serve_app(App(settings)))


async def _serve_app(app: Any) -> None:
    """Serve until a signal; a start-up that fails (a port in use, a model that does not load)
    stops what it had started, so the error is the last word rather than a shutdown's noise."""
    try:
        await app.run_until_signal()
    except Exception as exc:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(app.stop(grace=1.0), timeout=10.0)
        bind = _bind_error(exc, app.settings.server)
        if bind is not None:
            raise bind from exc
        raise


def _bind_error(exc: BaseException, server: ServerSettings) -> ConfigError | None:
    """A ConfigError naming the port and its flag, if `exc` is a failure to listen."""
    text = str(exc)
    if isinstance(exc, RuntimeError | OSError) and (
        text.startswith("Failed to bind to address") or text.startswith("cannot bind gRPC port")
    ):
        return _port_error("--grpc-port", server.host, server.grpc_port, None)
    if isinstance(exc, OSError) and (exc.strerror or "").startswith("cannot bind the HTTP port"):
        reason = os.strerror(exc.errno) if exc.errno else None
        return _port_error("--http-port", server.http_host or server.host, server.http_port, reason)
    if isinstance(exc, OSError) and exc.errno in (
        errno.EADDRINUSE,
        errno.EACCES,
        errno.EADDRNOTAVAIL,
    ):
        host = server.metrics_host or server.host
        return _port_error("--metrics-port", host, server.metrics_port, os.strerror(exc.errno))
    return None


def _port_error(flag: str, host: str, port: int, reason: str | None) -> ConfigError:
    reason = reason or _why_not_bindable(host, port)
    hint = {
        "--metrics-port": "0 picks a free one, -1 turns the metrics endpoint off",
        "--http-port": "0 picks a free one, -1 turns REST off",
    }.get(flag, "0 picks a free one")
    return ConfigError(
        f"{flag} {port}: cannot listen on {host or '0.0.0.0'}:{port}"
        f"{f' ({reason})' if reason else ''}: stop what holds it or choose another port ({hint})"
    )


def _why_not_bindable(host: str, port: int) -> str | None:
    """Why (host, port) cannot be bound now, from trying it (None when it can be)."""
    try:
        infos = socket.getaddrinfo(
            host.strip("[]") or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except OSError as exc:
        return f"host {host!r}: {exc.strerror or exc}"
    for family, kind, proto, _name, address in infos[:1]:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(address)
            except OSError as exc:
                return exc.strerror or str(exc)
    return None


def _worker(settings: Settings, index: int, debug: bool = False) -> None:
    # Each worker: its own process and batchers; its metrics on an internal loopback port
    # (metrics_port + 1 + index) that the parent merges into metrics_port.
    server = settings.server
    metrics_port = server.metrics_port + 1 + index if server.metrics_port > 0 else -1
    ready_file = f"{server.ready_file}.{index}" if server.ready_file else ""
    try:
        _serve_one(
            replace(
                settings,
                server=replace(
                    server,
                    metrics_port=metrics_port,
                    metrics_host="127.0.0.1",
                    ready_file=ready_file,
                    worker_index=index,
                    worker_count=server.workers,
                ),
            )
        )
    except Exception as exc:
        message = _user_error(exc)
        if message is None or debug:
            raise
        print(f"batchline: worker {index}: {message}", file=sys.stderr)
        raise SystemExit(2) from None


def _serve_workers(settings: Settings, debug: bool = False) -> int:
    """N processes on one port (SO_REUSEPORT); the parent forwards SIGTERM/SIGINT and waits."""
    server = settings.server
    if server.metrics_port > 0:
        # Bound before the workers start, so a port in use stops nothing but this process.
        from prometheus_client import CollectorRegistry

        from server.observability.aggregate import WorkerMetrics
        from server.observability.endpoint import start_metrics_server

        registry = CollectorRegistry()
        ports = [server.metrics_port + 1 + i for i in range(server.workers)]
        registry.register(WorkerMetrics(ports))
        try:
            start_metrics_server(server.metrics_port, server.metrics_host or server.host, registry)
        except OSError as exc:
            bind = _bind_error(exc, server)
            if bind is None:
                raise
            raise bind from exc
    ctx = multiprocessing.get_context("spawn")
    # The folder the workers coordinate through (control-state bumps and acks, shadow pairs
    # for the promotion gate in worker 0): private to this server, removed when it exits.
    worker_dir = tempfile.mkdtemp(prefix="batchline-workers-")
    atexit.register(shutil.rmtree, worker_dir, True)
    settings = replace(settings, server=replace(settings.server, worker_dir=worker_dir))
    procs = [
        ctx.Process(target=_worker, args=(settings, i, debug), name=f"batchline-{i}")
        for i in range(settings.server.workers)
    ]
    for proc in procs:
        proc.start()

    def forward(signum: int, _frame: object) -> None:
        for proc in procs:
            if proc.is_alive() and proc.pid is not None:
                os.kill(proc.pid, signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    for proc in procs:
        proc.join()
    return max((proc.exitcode or 0) for proc in procs)


def _import_model_folder(settings: Settings, label: str) -> Settings:
    """`--registry` naming model files instead of a registry (a Triton repository, or the one
    model.onnx a KServe storageUri downloads to /mnt/models): import them into a registry of
    their own in the cache, afresh at every start (the folder is the truth), and serve that.
    A one-file folder takes the name of the one model served (`--model NAME@production`)."""
    import hashlib

    from registry_client.file_registry import FileRegistry
    from registry_client.triton_repo import looks_like_models

    folder = Path(settings.server.registry)
    if not folder.is_dir() or FileRegistry(folder).list_models() or not looks_like_models(folder):
        return settings
    # One model's files (one .onnx, or one model's config.pbtxt / version folders) take the
    # name of the one model served; a repository's models keep their folder names.
    names = {m.name for m in settings.models}
    single = (
        any(folder.glob("*.onnx"))
        or (folder / "config.pbtxt").is_file()
        or any(c.is_dir() and c.name.isdecimal() for c in folder.iterdir())
    )
    name = next(iter(names)) if single and len(names) == 1 else None
    where = hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:16]
    base = settings.server.registry_cache_dir or os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    target = Path(base).expanduser() / "batchline" / "imported" / where
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    imported = registry_cli.import_folder(folder, name, lambda: FileRegistry(target), "production")
    models = ", ".join(item.model.name for item in imported)
    print(f"{label}: model files, not a registry: imported {models} into {target}", flush=True)
    return replace(settings, server=replace(settings.server, registry=str(target)))


def cmd_serve(args: argparse.Namespace) -> int:
    _check_config_file(args.config)
    settings = load_settings(
        args.config,
        env=os.environ,
        server_overrides={
            "registry": args.registry,
            "host": args.host,
            "grpc_port": args.grpc_port,
            "grpc_transport": args.grpc_transport,
            "http_port": args.http_port,
            "metrics_port": args.metrics_port,
            "workers": args.workers,
            "ready_file": args.ready_file,
            "grace_period_s": args.grace_period,
            "log_level": args.log_level,
            "log_format": args.log_format,
            "feature_store": args.feature_store,
            "admin_token": args.admin_token,
            "admin_token_file": args.admin_token_file,
        },
        model_refs=tuple(args.model or ()),
        model_overrides={
            "max_batch_size": args.max_batch_size,
            "max_queue_delay_us": args.max_queue_delay_us,
            "dynamic_batching": False if args.no_batching else None,
            "execution": args.execution,
            "instances": args.instances,
            "canary": args.canary,
            "canary_percent": args.canary_percent,
            "shadows": tuple(args.shadow) if args.shadow else None,
        },
    )
    registry = settings.server.registry
    if registry:
        label = f"--registry {registry}" if args.registry else f"server.registry {registry}"
        try:
            registry_cli.check_registry_folder(registry, label)
            settings = _import_model_folder(settings, label)
        except RegistryError as exc:
            raise ConfigError(str(exc)) from None
    if settings.server.workers > 1:
        return _serve_workers(settings, args.debug)
    _serve_one(settings)
    return 0


def _check_config_file(path: str | None) -> None:
    if path and Path(path).is_dir():
        raise ConfigError(f"--config {path}: a folder, not a batchline.toml file")


def _needs_train_extra(exc: ImportError, what: str) -> ConfigError | None:
    """A missing scikit-learn, skl2onnx or onnx named with the extra that brings them."""
    missing = (exc.name or "").split(".")[0]
    if missing not in _TRAIN_MODULES:
        return None
    return ConfigError(f"{what} needs {missing} (the 'train' extra): {INSTALL_TRAIN}")


def cmd_build_demo(args: argparse.Namespace) -> int:
    from registry_client.demo import build_demo

    try:
        built = build_demo(Path(args.registry), quick=args.quick, force=args.force)
    except ImportError as exc:
        error = _needs_train_extra(exc, "models build-demo (training the demo models)")
        if error is None:
            raise
        raise error from None
    for name, versions in built.items():
        for mv in versions:
            metrics = ", ".join(f"{k}={v:.4f}" for k, v in mv.metrics.items())
            print(f"{name} version {mv.version}  sha256 {mv.sha256[:12]}  {metrics}")
    return 0


def _feature_view(registry: str | None, ref: str) -> Any:
    from registry_client import open_registry
    from server.features.view import FeatureView

    try:
        spec, label = registry_cli.registry_spec(registry)
        registry_cli.check_registry_folder(spec, label)
        store = open_registry(spec)
        mv = store.resolve(ref)
    except RegistryError as exc:
        raise ConfigError(f"--model {ref}: {exc}") from exc
    attachment = getattr(store, "attachment", None)
    if attachment is None:
        raise ConfigError(f"{label}: keeps no feature views (a file registry folder does)")
    try:
        text = attachment(mv.name, mv.version, "feature_view.json").read_text()
    except RegistryError:
        raise ConfigError(
            f"--model {ref}: {mv.name} version {mv.version} has no feature view "
            "(feature_view.json attachment), so it takes feature tensors, not entity ids"
        ) from None
    try:
        return FeatureView.from_json(text)
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(
            f"--model {ref}: {mv.name} version {mv.version}: bad feature_view.json: {exc}"
        ) from None


STORE_SCHEMES = "redis://HOST:PORT/DB, rediss://, unix:///path/to/socket or sqlite:///PATH"


def check_store_url(url: str, flag: str = "--store") -> str:
    """The feature store URL, or a ConfigError naming the flag and the accepted forms."""
    if url.startswith("sqlite:"):
        if not url.startswith("sqlite:///"):
            rest = url.removeprefix("sqlite:").lstrip("/")
            raise ConfigError(
                f"{flag} {url}: a SQLite store is sqlite:///PATH, with three slashes: "
                f"sqlite:///{rest or 'features.db'} for a file here, sqlite:////abs/path for an "
                "absolute one"
            )
        if not url.removeprefix("sqlite:///"):
            raise ConfigError(f"{flag} {url}: names no file (sqlite:///features.db)")
        return url
    if url.startswith(("redis://", "rediss://", "unix://")):
        return url
    scheme = url.split("://", 1)[0] if "://" in url else ""
    what = f"{scheme}:// is not a feature store batchline can use" if scheme else "not a URL"
    raise ConfigError(f"{flag} {url}: {what}; expected {STORE_SCHEMES}")


def cmd_features_materialize(args: argparse.Namespace) -> int:
    """Offline rows -> the online store, through the model version's feature view."""
    from server.app import open_feature_store
    from server.features.materialize import check_table, materialize, read_table
    from server.features.store import FeatureStoreError

    url = check_store_url(args.store)
    path = Path(args.input)
    if not path.exists():
        raise ConfigError(f"--input {path}: no such file")
    if not path.is_file():
        raise ConfigError(f"--input {path}: not a file")
    view = _feature_view(args.registry, args.model)
    try:
        table = read_table(path)
        check_table(view, table)
    except ValueError as exc:
        raise ConfigError(f"--input {path}: {exc}") from None

    async def run() -> None:
        try:
            store = open_feature_store(url)
        except (FeatureStoreError, ValueError) as exc:
            raise ConfigError(f"--store {url}: {exc}") from None
        try:
            try:
                await store.ping()
                done = await materialize(view, table.rows, store)
            except FeatureStoreError as exc:
                raise ConfigError(f"--store {store.description}: cannot reach it: {exc}") from None
            except ValueError as exc:  # refused before writing (duplicated ids)
                raise ConfigError(f"--input {path}: {exc}") from None
        finally:
            with contextlib.suppress(FeatureStoreError, OSError):
                await store.close()
        skipped = f", {done.skipped_rows} rows without a {view.entity_key} skipped"
        print(
            f"materialized {len(done.entities)} {view.entity_key} rows of {view.name} into "
            f"{store.description} ({done.bad_values} empty or non-numeric values stored as "
            f"missing, served as the view's defaults"
            f"{skipped if done.skipped_rows else ''})"
        )

    _run(run())
    return 0


def cmd_features_show(args: argparse.Namespace) -> int:
    view = _feature_view(args.registry, args.model)
    print(view.to_json())
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from server.demo import run_demo

    _configure_logging("warning")
    try:
        return run_demo(Path(args.registry), requests=args.requests, concurrency=args.concurrency)
    except ImportError as exc:
        error = _needs_train_extra(exc, "demo (training the demo models)")
        if error is None:
            raise
        raise error from None


def _read(flag: str, path: str | None) -> bytes | None:
    if not path:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"{flag} {path}: {exc.strerror or exc}") from None


def cmd_drift(args: argparse.Namespace) -> int:
    from server.drift.sidecar import run_sidecar

    settings = load_settings(args.config, env=os.environ)
    base = replace(settings.drift, registry=settings.drift.registry or settings.server.registry)
    drift = drift_settings.settings_from_args(args, base)
    _configure_logging(drift.log_level)
    try:
        _run(run_sidecar(drift))
    except (RuntimeError, OSError) as exc:
        text = str(exc)
        if text.startswith(("Failed to bind to address", "cannot bind the drift gRPC port")):
            raise _port_error("--grpc-port", drift.host, drift.grpc_port, None) from exc
        if isinstance(exc, OSError) and exc.errno in (errno.EADDRINUSE, errno.EACCES):
            reason = os.strerror(exc.errno)
            raise _port_error("--http-port", drift.host, drift.http_port, reason) from exc
        raise
    return 0


def cmd_health(args: argparse.Namespace) -> int:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    if args.tls_ca or args.tls_cert:
        credentials = grpc.ssl_channel_credentials(
            _read("--tls-ca", args.tls_ca),
            _read("--tls-key", args.tls_key),
            _read("--tls-cert", args.tls_cert),
        )
        channel = grpc.secure_channel(args.address, credentials)
    else:
        channel = grpc.insecure_channel(args.address)
    try:
        with channel:
            stub = health_pb2_grpc.HealthStub(channel)
            reply = stub.Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout
            )
    except grpc.RpcError as exc:
        print(f"unhealthy: {_health_error(args, exc)}", file=sys.stderr)
        return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(status)
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


def _health_error(args: argparse.Namespace, exc: Any) -> str:
    import grpc

    from server.api.server import SERVICE_NAME

    code = exc.code()
    if code == grpc.StatusCode.NOT_FOUND:
        return (
            f"--service {args.service!r}: {args.address} has no such health service (it answers "
            f"for '' (the whole server) and {SERVICE_NAME!r}; a model's state: "
            f"batchline admin status {args.service} --address {args.address})"
        )
    if code == grpc.StatusCode.UNAVAILABLE:
        return f"cannot reach {args.address} (--address): UNAVAILABLE: {exc.details()}"
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return f"{args.address} did not answer within {args.timeout:g}s (--timeout)"
    return f"{args.address}: {code.name}: {exc.details() or 'no details'}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="batchline",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--debug", action="store_true", help="show tracebacks of errors (anywhere on the line)"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", help="serve models over gRPC (Open Inference Protocol)")
    serve.add_argument("--config", help="batchline.toml")
    serve.add_argument("--registry", help="file registry folder")
    serve.add_argument(
        "--model", action="append", metavar="NAME@ALIAS", help="a model to serve (repeatable)"
    )
    serve.add_argument("--host")
    serve.add_argument("--grpc-port", type=int)
    serve.add_argument(
        "--grpc-transport",
        choices=("grpcio", "native"),
        help="gRPC's server: grpcio (grpc.aio on gRPC core) or native (HTTP/2 on the loop)",
    )
    serve.add_argument(
        "--http-port", type=int, help="V2 REST port (default 8000); 0: any free port; -1: off"
    )
    serve.add_argument("--metrics-port", type=int, help="0: any free port; -1: none")
    serve.add_argument("--workers", type=int, help="processes sharing the gRPC port (SO_REUSEPORT)")
    serve.add_argument("--ready-file", help="write the bound ports here as JSON once serving")
    serve.add_argument("--grace-period", type=float, help="seconds to drain on SIGTERM")
    serve.add_argument("--log-level")
    serve.add_argument(
        "--log-format",
        choices=("auto", "text", "json"),
        help="text lines or JSON lines (default auto: text on a terminal, JSON otherwise)",
    )
    serve.add_argument("--max-batch-size", type=int)
    serve.add_argument("--max-queue-delay-us", type=int)
    serve.add_argument("--no-batching", action="store_true", help="run every request alone")
    serve.add_argument("--execution", choices=("auto", "inline", "executor"))
    serve.add_argument("--instances", type=int)
    serve.add_argument(
        "--feature-store", help="redis://... or sqlite:///path (entity-keyed requests)"
    )
    serve.add_argument(
        "--admin-token",
        help="bearer token required by admin RPCs (visible in the process list: prefer "
        "BATCHLINE_ADMIN_TOKEN or --admin-token-file)",
    )
    serve.add_argument("--admin-token-file", help="file holding the admin bearer token")
    serve.add_argument("--canary", metavar="VERSION", help="canary version (with --canary-percent)")
    serve.add_argument("--canary-percent", type=float)
    serve.add_argument(
        "--shadow", action="append", metavar="VERSION", help="a shadow version (repeatable)"
    )
    serve.set_defaults(func=cmd_serve)

    models = sub.add_parser("models", help="model utilities")
    models_sub = models.add_subparsers(dest="models_command", required=True)
    demo_models = models_sub.add_parser(
        "build-demo", help="train the demo models into a file registry"
    )
    demo_models.add_argument("--registry", required=True)
    demo_models.add_argument("--quick", action="store_true", help="smaller training (tests)")
    demo_models.add_argument("--force", action="store_true", help="rebuild even if present")
    demo_models.set_defaults(func=cmd_build_demo)

    features = sub.add_parser("features", help="online features")
    features_sub = features.add_subparsers(dest="features_command", required=True)
    mat = features_sub.add_parser(
        "materialize", help="write offline rows (CSV or Parquet) into the online store"
    )
    mat.add_argument("--registry", help="file registry folder (default: $BATCHLINE_REGISTRY)")
    mat.add_argument("--model", required=True, metavar="NAME@ALIAS", help="whose feature view")
    mat.add_argument(
        "--input",
        required=True,
        help="CSV, JSON (.json, .jsonl) or Parquet with the entity key and every feature column",
    )
    mat.add_argument("--store", required=True, help="redis://HOST:PORT/DB or sqlite:///PATH")
    mat.set_defaults(func=cmd_features_materialize)
    show = features_sub.add_parser("show", help="print a model version's feature view")
    show.add_argument("--registry", help="file registry folder (default: $BATCHLINE_REGISTRY)")
    show.add_argument("--model", required=True, metavar="NAME@ALIAS")
    show.set_defaults(func=cmd_features_show)

    demo = sub.add_parser("demo", help="build, serve and exercise the demo models in one go")
    demo.add_argument("--registry", default="demo-registry")
    demo.add_argument("--requests", type=int, default=2000)
    demo.add_argument("--concurrency", type=int, default=32)
    demo.set_defaults(func=cmd_demo)

    registry_cli.add_subcommands(sub)
    admin_cli.add_subcommands(sub)

    drift = sub.add_parser("drift", help="the drift sidecar (gRPC 8011, metrics and report 8012)")
    drift.add_argument("--config", help="batchline.toml ([drift] and [server].registry)")
    drift_settings.add_arguments(drift)
    drift.set_defaults(func=cmd_drift)
    drift_sub = drift.add_subparsers(dest="drift_command")
    drift_report_parser = drift_sub.add_parser("report", help="print a running sidecar's report")
    drift_report.add_arguments(drift_report_parser)
    drift_report_parser.set_defaults(func=drift_report.run)

    shadow = sub.add_parser("shadow", help="shadow evaluation")
    shadow_sub = shadow.add_subparsers(dest="shadow_command", required=True)
    report = shadow_sub.add_parser("report", help="primary vs shadow side by side, per version")
    shadow_report.configure_parser(report)

    health = sub.add_parser("health", help="gRPC health check (exit 0 when SERVING)")
    health.add_argument("--address", default="127.0.0.1:8001")
    health.add_argument("--service", default="")
    health.add_argument("--timeout", type=float, default=2.0)
    health.add_argument("--tls-ca", help="CA to verify the server (enables TLS)")
    health.add_argument("--tls-cert", help="client certificate (mutual TLS)")
    health.add_argument("--tls-key", help="client key (mutual TLS)")
    health.set_defaults(func=cmd_health)
    return parser


def _user_error(exc: BaseException) -> str | None:
    """The one-line message for an error the user can fix; None for anything else (a bug)."""
    from server.features.store import FeatureStoreError

    if isinstance(exc, ConfigError | ServingError | RegistryError | FeatureStoreError):
        return str(exc)
    if isinstance(exc, OSError):
        where = f"{exc.filename}: " if exc.filename else ""
        return f"{where}{exc.strerror or exc}"
    return None


def main(argv: Sequence[str] | None = None) -> int:
    words = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in words
    args = build_parser().parse_args([w for w in words if w != "--debug"])
    args.debug = debug
    try:
        code = int(args.func(args))
        sys.stdout.flush()
        return code
    except BrokenPipeError:
        # The reader went away (`batchline registry show X | head -1`): stop quietly, and keep
        # the interpreter's final flush from printing the same error again.
        with contextlib.suppress(OSError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        return 141
    except KeyboardInterrupt:
        if debug:
            raise
        return 130
    except Exception as exc:
        message = _user_error(exc)
        if debug:
            traceback.print_exc()
        if message is not None:
            print(f"batchline: {message}", file=sys.stderr)
            return 2
        if not debug:
            print(
                f"batchline: internal error: {type(exc).__name__}: {exc} (a bug: rerun with "
                "--debug for the traceback and report it)",
                file=sys.stderr,
            )
        return 70


if __name__ == "__main__":
    raise SystemExit(main())
