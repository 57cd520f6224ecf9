"""argv -> Settings -> App. `batchline serve | demo | health | models build-demo`."""

from __future__ import annotations

import argparse
import asyncio
import atexit
import multiprocessing
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from registry_client import cli as registry_cli
from server import drift as drift_settings
from server import shadow as shadow_report
from server.config import Settings, load_settings
from server.drift import report as drift_report
from server.errors import ConfigError, ServingError


def _run(coro: object) -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        asyncio.run(coro)  # type: ignore[arg-type]
    else:
        uvloop.run(coro)  # type: ignore[arg-type]


def _configure_logging(level: str) -> None:
    from server.observability.logging import configure

    configure(level)


def _serve_one(settings: Settings) -> None:
    from server.app import App

    _configure_logging(settings.server.log_level)
    _run(App(settings).run_until_signal())


def _worker(settings: Settings, index: int) -> None:
    # Each worker: its own process and batchers; its metrics on an internal loopback port
    # (metrics_port + 1 + index) that the parent merges into metrics_port.
    server = settings.server
    metrics_port = server.metrics_port + 1 + index if server.metrics_port > 0 else -1
    ready_file = f"{server.ready_file}.{index}" if server.ready_file else ""
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


def _serve_workers(settings: Settings) -> int:
    """N processes on one port (SO_REUSEPORT); the parent forwards SIGTERM/SIGINT and waits."""
    ctx = multiprocessing.get_context("spawn")
    # The folder the workers coordinate through (control-state bumps and acks, shadow pairs
    # for the promotion gate in worker 0): private to this server, removed when it exits.
    worker_dir = tempfile.mkdtemp(prefix="batchline-workers-")
    atexit.register(shutil.rmtree, worker_dir, True)
    settings = replace(settings, server=replace(settings.server, worker_dir=worker_dir))
    procs = [
        ctx.Process(target=_worker, args=(settings, i), name=f"batchline-{i}")
        for i in range(settings.server.workers)
    ]
    for proc in procs:
        proc.start()
    server = settings.server
    if server.metrics_port > 0:
        from prometheus_client import CollectorRegistry, start_http_server

        from server.observability.aggregate import WorkerMetrics

        registry = CollectorRegistry()
        ports = [server.metrics_port + 1 + i for i in range(server.workers)]
        registry.register(WorkerMetrics(ports))
        start_http_server(
            server.metrics_port, addr=server.metrics_host or server.host, registry=registry
        )

    def forward(signum: int, _frame: object) -> None:
        for proc in procs:
            if proc.is_alive() and proc.pid is not None:
                os.kill(proc.pid, signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    for proc in procs:
        proc.join()
    return max((proc.exitcode or 0) for proc in procs)


def cmd_serve(args: argparse.Namespace) -> int:
    settings = load_settings(
        args.config,
        env=os.environ,
        server_overrides={
            "registry": args.registry,
            "host": args.host,
            "grpc_port": args.grpc_port,
            "metrics_port": args.metrics_port,
            "workers": args.workers,
            "ready_file": args.ready_file,
            "grace_period_s": args.grace_period,
            "log_level": args.log_level,
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
    if settings.server.workers > 1:
        return _serve_workers(settings)
    _serve_one(settings)
    return 0


def cmd_build_demo(args: argparse.Namespace) -> int:
    from registry_client.demo import build_demo

    built = build_demo(Path(args.registry), quick=args.quick, force=args.force)
    for name, versions in built.items():
        for mv in versions:
            metrics = ", ".join(f"{k}={v:.4f}" for k, v in mv.metrics.items())
            print(f"{name} version {mv.version}  sha256 {mv.sha256[:12]}  {metrics}")
    return 0


def _feature_view(registry: str, ref: str) -> object:
    from registry_client import FileRegistry, RegistryError
    from server.features.view import FeatureView

    store = FileRegistry(Path(registry))
    try:
        mv = store.resolve(ref)
        text = store.attachment(mv.name, mv.version, "feature_view.json").read_text()
    except RegistryError as exc:
        raise ConfigError(f"--model {ref}: {exc}") from exc
    return FeatureView.from_json(text)


def cmd_features_materialize(args: argparse.Namespace) -> int:
    """Offline rows -> the online store, through the model version's feature view."""
    from server.app import open_feature_store
    from server.features.materialize import materialize, read_rows
    from server.features.view import FeatureView

    view = _feature_view(args.registry, args.model)
    assert isinstance(view, FeatureView)

    async def run() -> None:
        store = open_feature_store(args.store)
        try:
            done = await materialize(view, read_rows(Path(args.input)), store)
        finally:
            await store.close()
        print(
            f"materialized {len(done.entities)} {view.entity_key} rows of {view.name} into "
            f"{store.description} ({done.bad_values} missing or bad values stored as NaN, "
            f"{done.skipped_rows} rows without an id skipped)"
        )

    try:
        _run(run())
    except ValueError as exc:  # a refused input file (duplicated ids, unreadable Parquet)
        print(f"batchline: features materialize: {args.input}: {exc}", file=sys.stderr)
        return 2
    return 0


def cmd_features_show(args: argparse.Namespace) -> int:
    view = _feature_view(args.registry, args.model)
    print(view.to_json())  # type: ignore[attr-defined]
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from server.demo import run_demo

    _configure_logging("warning")
    return run_demo(Path(args.registry), requests=args.requests, concurrency=args.concurrency)


def _read(path: str | None) -> bytes | None:
    return Path(path).read_bytes() if path else None


def cmd_drift(args: argparse.Namespace) -> int:
    from server.drift.sidecar import run_sidecar

    settings = load_settings(args.config, env=os.environ)
    base = replace(settings.drift, registry=settings.drift.registry or settings.server.registry)
    drift = drift_settings.settings_from_args(args, base)
    _configure_logging(drift.log_level)
    _run(run_sidecar(drift))
    return 0


def cmd_health(args: argparse.Namespace) -> int:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    try:
        if args.tls_ca or args.tls_cert:
            credentials = grpc.ssl_channel_credentials(
                _read(args.tls_ca), _read(args.tls_key), _read(args.tls_cert)
            )
            channel = grpc.secure_channel(args.address, credentials)
        else:
            channel = grpc.insecure_channel(args.address)
        with channel:
            stub = health_pb2_grpc.HealthStub(channel)
            reply = stub.Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout
            )
    except grpc.RpcError as exc:
        print(f"unhealthy: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(status)
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="batchline", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="serve models over gRPC (Open Inference Protocol)")
    serve.add_argument("--config", help="batchline.toml")
    serve.add_argument("--registry", help="file registry folder")
    serve.add_argument(
        "--model", action="append", metavar="NAME@ALIAS", help="a model to serve (repeatable)"
    )
    serve.add_argument("--host")
    serve.add_argument("--grpc-port", type=int)
    serve.add_argument("--metrics-port", type=int, help="0: any free port; -1: none")
    serve.add_argument("--workers", type=int, help="processes sharing the gRPC port (SO_REUSEPORT)")
    serve.add_argument("--ready-file", help="write the bound ports here as JSON once serving")
    serve.add_argument("--grace-period", type=float, help="seconds to drain on SIGTERM")
    serve.add_argument("--log-level")
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
    mat.add_argument("--registry", required=True)
    mat.add_argument("--model", required=True, metavar="NAME@ALIAS", help="whose feature view")
    mat.add_argument("--input", required=True, help="CSV (or Parquet) with the entity key column")
    mat.add_argument("--store", required=True, help="redis://... or sqlite:///path")
    mat.set_defaults(func=cmd_features_materialize)
    show = features_sub.add_parser("show", help="print a model version's feature view")
    show.add_argument("--registry", required=True)
    show.add_argument("--model", required=True, metavar="NAME@ALIAS")
    show.set_defaults(func=cmd_features_show)

    demo = sub.add_parser("demo", help="build, serve and exercise the demo models in one go")
    demo.add_argument("--registry", default="demo-registry")
    demo.add_argument("--requests", type=int, default=2000)
    demo.add_argument("--concurrency", type=int, default=32)
    demo.set_defaults(func=cmd_demo)

    registry_cli.add_subcommands(sub)

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


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (ConfigError, ServingError) as exc:
        print(f"batchline: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
