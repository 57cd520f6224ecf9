"""`batchline admin status | reload | route get | route set`: a running server's AdminService.

The token comes from ``$BATCHLINE_ADMIN_TOKEN`` or a file (``--token-file``, or
``$BATCHLINE_ADMIN_TOKEN_FILE``), never a flag (a flag shows in the process list); it is sent as
``authorization: Bearer <token>`` metadata. Output is for people, ``--json`` for machines.
Errors are one line naming the address, the model or the token's source, with exit status 1
for what the server refused or could not do and 2 for a mistake on this side (a missing token
file, say).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from server.errors import ConfigError

TOKEN_ENV = "BATCHLINE_ADMIN_TOKEN"
TOKEN_FILE_ENV = "BATCHLINE_ADMIN_TOKEN_FILE"
PROG = "batchline admin"


def add_subcommands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    admin = sub.add_parser(
        "admin",
        help="a running server's models: status, reload, traffic routes (AdminService)",
        description="Talk to a running server's AdminService. The admin token comes from "
        f"${TOKEN_ENV} or a file (--token-file, ${TOKEN_FILE_ENV}); a server on a loopback "
        "address with no token configured needs none.",
    )
    commands = admin.add_subparsers(dest="admin_command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--address", default="127.0.0.1:8001", help="host:port of the server")
    common.add_argument(
        "--token-file", help=f"file holding the admin token (default: ${TOKEN_FILE_ENV})"
    )
    common.add_argument("--timeout", type=float, default=30.0, help="seconds (default 30)")
    common.add_argument("--tls-ca", help="CA to verify the server (enables TLS)")
    common.add_argument("--tls-cert", help="client certificate (mutual TLS)")
    common.add_argument("--tls-key", help="client key (mutual TLS)")
    common.add_argument("--json", action="store_true", help="print JSON")

    status = commands.add_parser(
        "status", parents=[common], help="served models: version, alias, state, last reload"
    )
    status.add_argument("model", nargs="?", default="", help="one model (default: every one)")
    status.set_defaults(func=run, admin_func=cmd_status)

    reload = commands.add_parser(
        "reload",
        parents=[common],
        help="re-resolve a model's alias in the registry and swap to what it names",
    )
    reload.add_argument("model")
    reload.add_argument(
        "--ref", default="", help="serve this ref from now on instead (e.g. churn@3)"
    )
    reload.set_defaults(func=run, admin_func=cmd_reload)

    route = commands.add_parser("route", help="a model's traffic split: canary and shadows")
    route_sub = route.add_subparsers(dest="route_command", required=True)
    get = route_sub.add_parser("get", parents=[common], help="print a model's route")
    get.add_argument("model")
    get.set_defaults(func=run, admin_func=cmd_route_get)
    put = route_sub.add_parser(
        "set",
        parents=[common],
        help="replace a model's route (what is not given is cleared: no canary, no shadows)",
    )
    put.add_argument("model")
    put.add_argument("--primary", default="", help="must be the served version (default: it)")
    put.add_argument("--canary", default="", metavar="VERSION", help="canary version")
    put.add_argument(
        "--canary-percent", type=float, default=0.0, help="share of traffic the canary answers"
    )
    put.add_argument(
        "--shadow",
        action="append",
        default=[],
        type=_shadow,
        metavar="VERSION[:PERCENT]",
        help="a shadow version and the share of requests mirrored to it (repeatable; 100)",
    )
    put.set_defaults(func=run, admin_func=cmd_route_set)


# -- commands --------------------------------------------------------------------------------


def cmd_status(args: argparse.Namespace) -> int:
    from server._proto import admin_pb2 as pb

    reply = _call(args, "ModelStatus", pb.ModelStatusRequest(model=args.model))
    models = [_state_dict(m) for m in reply.models]
    if args.json:
        _print_json(models)
        return 0
    if not models:
        print(f"{args.address} serves no models")
        return 0
    rows = [
        (
            m["name"],
            m["version"],
            m["alias"] or "-",
            m["state"],
            m["execution"],
            str(m["reloads"]),
            str(m["failed_reloads"]),
            _when(m["loaded_at_unix_ms"]),
            m["sha256"][:12],
        )
        for m in models
    ]
    header = (
        "MODEL", "VERSION", "ALIAS", "STATE", "EXECUTION", "RELOADS", "FAILED", "LOADED", "SHA256"
    )  # fmt: skip
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]
    for row in (header, *rows):
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    for m in models:
        if m["last_error"]:
            print(f"{m['name']}: last reload failed: {m['last_error']}")
    return 0


def cmd_reload(args: argparse.Namespace) -> int:
    from server._proto import admin_pb2 as pb

    reply = _call(args, "ReloadModel", pb.ReloadModelRequest(model=args.model, ref=args.ref))
    result = {
        "model": reply.model,
        "version": reply.version,
        "previous_version": reply.previous_version,
        "changed": reply.changed,
        "message": reply.message,
    }
    if args.json:
        _print_json(result)
        return 0
    if reply.changed:
        line = f"{reply.model}: version {reply.previous_version} -> {reply.version}"
    else:
        line = f"{reply.model}: version {reply.version}, unchanged"
    said = reply.message and reply.message not in ("swapped", "unchanged")
    print(f"{line} ({reply.message})" if said else line)
    return 0


def cmd_route_get(args: argparse.Namespace) -> int:
    from server._proto import admin_pb2 as pb

    reply = _call(args, "GetRoute", pb.GetRouteRequest(model=args.model))
    if args.json:
        _print_json(_route_dict(reply))
    else:
        print(_route_text(reply))
    return 0


def cmd_route_set(args: argparse.Namespace) -> int:
    from server._proto import admin_pb2 as pb

    if args.canary_percent and not args.canary:
        raise ConfigError("--canary-percent: give the canary version too (--canary VERSION)")
    if not 0 <= args.canary_percent <= 100:
        raise ConfigError(f"--canary-percent: expected 0..100, got {args.canary_percent:g}")
    spec = pb.RouteSpec(
        model=args.model,
        primary=args.primary,
        canary=args.canary,
        canary_percent=args.canary_percent,
        shadows=[pb.ShadowTarget(version=v, sample_percent=p) for v, p in args.shadow],
    )
    before = _call(args, "GetRoute", pb.GetRouteRequest(model=args.model))
    reply = _call(args, "SetRoute", spec)
    if args.json:
        _print_json({"before": _route_dict(before), "after": _route_dict(reply)})
    else:
        print(f"was {_route_text(before)}")
        print(f"now {_route_text(reply)}")
    return 0


# -- the call --------------------------------------------------------------------------------


class AdminCallError(Exception):
    """What the server refused, or why it could not be reached: one line, exit status 1."""


def run(args: argparse.Namespace) -> int:
    """Run an admin command: its own errors as one line on stderr."""
    func: Callable[[argparse.Namespace], int] = args.admin_func
    command = " ".join(c for c in (args.admin_command, getattr(args, "route_command", "")) if c)
    try:
        return func(args)
    except AdminCallError as exc:
        print(f"{PROG} {command}: {exc}", file=sys.stderr)
        return 1
    except ConfigError as exc:
        print(f"{PROG} {command}: {exc}", file=sys.stderr)
        return 2


def token(args: argparse.Namespace, env: dict[str, str] | None = None) -> tuple[str, str]:
    """The admin token and where it came from ('' when none is configured here)."""
    environ = dict(os.environ) if env is None else env
    path = args.token_file or environ.get(TOKEN_FILE_ENV, "")
    if path:
        source = f"--token-file {path}" if args.token_file else f"{TOKEN_FILE_ENV}={path}"
        try:
            value = Path(path).read_text().strip()
        except OSError as exc:
            raise ConfigError(f"{source}: cannot read it: {exc.strerror or exc}") from None
        if not value:
            raise ConfigError(f"{source}: the file is empty")
        return value, source
    value = environ.get(TOKEN_ENV, "").strip()
    return value, (TOKEN_ENV if value else "")


def _call(args: argparse.Namespace, method: str, request: Any) -> Any:
    import grpc

    from server._proto import admin_pb2_grpc as pb_grpc

    secret, source = token(args)
    metadata = (("authorization", f"Bearer {secret}"),) if secret else None
    channel = _channel(args)
    try:
        with channel:
            stub = pb_grpc.AdminServiceStub(channel)
            return getattr(stub, method)(request, metadata=metadata, timeout=args.timeout)
    except grpc.RpcError as exc:
        raise AdminCallError(_explain(args, exc, source)) from None


def _channel(args: argparse.Namespace) -> Any:
    import grpc

    if not (args.tls_ca or args.tls_cert or args.tls_key):
        return grpc.insecure_channel(args.address)
    if bool(args.tls_cert) != bool(args.tls_key):
        raise ConfigError("--tls-cert and --tls-key: give both (mutual TLS) or neither")

    def read(flag: str, path: str | None) -> bytes | None:
        if not path:
            return None
        try:
            return Path(path).read_bytes()
        except OSError as exc:
            raise ConfigError(f"{flag} {path}: {exc.strerror or exc}") from None

    credentials = grpc.ssl_channel_credentials(
        read("--tls-ca", args.tls_ca),
        read("--tls-key", args.tls_key),
        read("--tls-cert", args.tls_cert),
    )
    return grpc.secure_channel(args.address, credentials)


def _explain(args: argparse.Namespace, exc: Any, source: str) -> str:
    import grpc

    code = exc.code()
    details = exc.details() or ""
    where = f"{args.address}"
    if code == grpc.StatusCode.UNAUTHENTICATED:
        if source:
            return f"{where} refused the admin token from {source} (UNAUTHENTICATED): check it"
        return (
            f"{where} needs an admin token (UNAUTHENTICATED): set {TOKEN_ENV} or pass "
            "--token-file FILE"
        )
    if code == grpc.StatusCode.UNAVAILABLE:
        return (
            f"cannot reach {where} (--address): is `batchline serve` running there? "
            f"(UNAVAILABLE: {details})"
        )
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return f"{where} did not answer within {args.timeout:g}s (--timeout)"
    if code == grpc.StatusCode.UNIMPLEMENTED:
        return f"{where} has no batchline AdminService (UNIMPLEMENTED): is it a batchline server?"
    return f"{where}: {code.name}: {details}"


# -- rendering -------------------------------------------------------------------------------


def _state_dict(m: Any) -> dict[str, Any]:
    return {
        "name": m.name,
        "version": m.version,
        "ref": m.ref,
        "alias": m.alias,
        "sha256": m.sha256,
        "state": m.state,
        "last_error": m.last_error,
        "loaded_at_unix_ms": m.loaded_at_unix_ms,
        "last_check_unix_ms": m.last_check_unix_ms,
        "metrics": dict(sorted(m.metrics.items())),
        "tags": dict(sorted(m.tags.items())),
        "source": m.source,
        "created": m.created,
        "execution": m.execution,
        "reloads": m.reloads,
        "failed_reloads": m.failed_reloads,
    }


def _route_dict(route: Any) -> dict[str, Any]:
    return {
        "model": route.model,
        "primary": route.primary,
        "canary": route.canary,
        "canary_percent": route.canary_percent,
        "shadows": [
            {"version": s.version, "sample_percent": s.sample_percent or 100.0}
            for s in route.shadows
        ],
    }


def _route_text(route: Any) -> str:
    canary = f"{route.canary} ({route.canary_percent:g}%)" if route.canary else "-"
    shadows = (
        ", ".join(f"{s.version} ({s.sample_percent or 100.0:g}%)" for s in route.shadows) or "-"
    )
    return f"{route.model}: primary {route.primary}, canary {canary}, shadows {shadows}"


def _when(unix_ms: int) -> str:
    if not unix_ms:
        return "-"
    return datetime.fromtimestamp(unix_ms / 1000, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _shadow(text: str) -> tuple[str, float]:
    version, sep, percent = text.partition(":")
    if not version:
        raise argparse.ArgumentTypeError(f"expected VERSION[:PERCENT], got {text!r}")
    if not sep:
        return version, 100.0
    try:
        value = float(percent)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: {percent!r} is not a number") from None
    if not 0 < value <= 100:
        raise argparse.ArgumentTypeError(f"{text!r}: the percent must be in (0, 100]")
    return version, value


def _print_json(value: Any) -> None:
    json.dump(value, sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")
