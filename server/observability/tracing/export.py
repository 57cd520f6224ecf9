"""The export side: the flat records the recorder hands on, `SpanBuilder` (records -> the
SDK's ReadableSpans), the sinks (an exporter in this process, or a pipe to the export process)
and the export process itself (`python -m server.observability.tracing`: frames from stdin
to the console or OTLP exporter, off the server's GIL).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import importlib
import importlib.util
import logging
import marshal
import os
import select
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any, Protocol

from opentelemetry.sdk.resources import SERVICE_NAME, SERVICE_VERSION, Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import ConsoleSpanExporter, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode, TraceFlags

from server import __version__
from server.observability.tracing.propagation import (
    _RANDOM_TRACE_ID,
    _SAMPLED,
    _span_id,
    _trace_id,
    _trace_state,
)
from server.observability.tracing.settings import OTLP_MODULES, TracingSettings

log = logging.getLogger(__name__)

AttributeValue = (
    str | bool | int | float | Sequence[str] | Sequence[bool] | Sequence[int] | Sequence[float]
)
Attributes = Mapping[str, AttributeValue]  # kept as given, never changed
Record = tuple[Any, ...]

# gRPC status names -> codes, for the `rpc.grpc.status_code` attribute (no grpc import here).
_GRPC_STATUS_NAMES = (
    "OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND",
    "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "ABORTED",
    "OUT_OF_RANGE", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED",
)  # fmt: skip
GRPC_STATUS_CODES = {name: code for code, name in enumerate(_GRPC_STATUS_NAMES)}
_UNSET = Status(StatusCode.UNSET)
_REQUEST = 0
_BATCH = 1
_FRAME = struct.Struct("!IB")  # payload size, encoding
_MARSHAL = 0


class _Sink(Protocol):
    def ready(self) -> bool:
        """Whether `export` would take records now."""
        ...

    def export(self, records: list[Record]) -> int:
        """Hand records on without blocking for long; return how many were dropped."""
        ...

    def shutdown(self, timeout: float) -> None: ...


# ---- records -> OTel spans (in the export thread or the export process) ---------------------


class _SharedResource(Resource):
    """One Resource for every span; its hash, which the OTLP encoder takes per span (a JSON
    dump of the attributes each time in the SDK), is computed once."""

    def __init__(self, attributes: Any, schema_url: str | None = None) -> None:
        super().__init__(attributes, schema_url)
        self._hash = super().__hash__()

    def __hash__(self) -> int:
        return self._hash


class SpanBuilder:
    """Turns flat trace records into the SDK's ReadableSpans (one shared resource and scope)."""

    def __init__(self, service_name: str) -> None:
        created = Resource.create({SERVICE_NAME: service_name, SERVICE_VERSION: __version__})
        self.resource = _SharedResource(created.attributes, created.schema_url)
        self.scope = InstrumentationScope("batchline", __version__)

    def build(self, records: Iterable[Record], out: list[ReadableSpan]) -> None:
        resource = self.resource
        scope = self.scope
        append = out.append
        for record in records:
            if record[0] == _REQUEST:
                (
                    _,
                    name,
                    trace_id,
                    span_id,
                    parent_id,
                    flags,
                    raw_state,
                    attributes,
                    extra,
                    start_ns,
                    end_ns,
                    status,
                    message,
                    children,
                ) = record
                trace_flags = TraceFlags(flags)
                state = _trace_state(raw_state)
                context = SpanContext(trace_id, span_id, False, trace_flags, state)
                merged: dict[str, AttributeValue] = dict(attributes) if attributes else {}
                if extra:
                    merged.update(extra)
                merged["rpc.grpc.status_code"] = GRPC_STATUS_CODES.get(status, 2)
                append(
                    ReadableSpan(
                        name,
                        context=context,
                        parent=SpanContext(trace_id, parent_id, True, trace_flags, state)
                        if parent_id
                        else None,
                        resource=resource,
                        attributes=merged,
                        kind=SpanKind.SERVER,
                        status=_UNSET
                        if status == "OK"
                        else Status(
                            StatusCode.ERROR, f"{status}: {message}" if message else status
                        ),
                        start_time=start_ns,
                        end_time=end_ns,
                        instrumentation_scope=scope,
                    )
                )
                for child_name, child_start, child_end, child_attributes in children:
                    append(
                        ReadableSpan(
                            child_name,
                            context=SpanContext(trace_id, _span_id(), False, trace_flags, state),
                            parent=context,
                            resource=resource,
                            attributes=child_attributes,
                            kind=SpanKind.INTERNAL,
                            status=_UNSET,
                            start_time=child_start,
                            end_time=child_end,
                            instrumentation_scope=scope,
                        )
                    )
            else:
                _, model, version, rows, start_ns, end_ns, ok, linked = record
                append(
                    ReadableSpan(
                        "batch",
                        context=SpanContext(
                            _trace_id(), _span_id(), False, TraceFlags(_SAMPLED | _RANDOM_TRACE_ID)
                        ),
                        resource=resource,
                        attributes={
                            "batchline.model": model,
                            "batchline.model_version": version,
                            "batchline.batch.rows": rows,
                            "batchline.batch.requests": len(linked),
                        },
                        links=[
                            Link(SpanContext(t, s, False, TraceFlags(f), _trace_state(ts)))
                            for t, s, f, ts in linked
                        ],
                        kind=SpanKind.INTERNAL,
                        status=_UNSET if ok else Status(StatusCode.ERROR, "batch failed"),
                        start_time=start_ns,
                        end_time=end_ns,
                        instrumentation_scope=scope,
                    )
                )


class _ExporterSink:
    """Builds spans and exports them in this process."""

    def __init__(self, exporter: SpanExporter, builder: SpanBuilder) -> None:
        self.exporter = exporter
        self.builder = builder

    def ready(self) -> bool:
        return True

    def export(self, records: list[Record]) -> int:
        spans: list[ReadableSpan] = []
        self.builder.build(records, spans)
        _export(self.exporter, spans)
        return 0

    def shutdown(self, timeout: float) -> None:
        self.exporter.shutdown()


class _ProcessSink:
    """Sends records down a pipe to the export process (`main` below), never blocking: the
    pipe is non-blocking, and a frame the pipe can't take whole waits as the backlog, which
    makes the sink not `ready` (so the records wait in the Tracing's queue)."""

    def __init__(
        self,
        settings: TracingSettings,
        exporter: str | None = None,
        command: Sequence[str] | None = None,
    ) -> None:
        package_root = str(Path(__file__).resolve().parents[3])
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
        if command is None:
            command = [
                sys.executable,
                "-m",
                "server.observability.tracing",
                "--exporter",
                exporter or settings.exporter,
                "--service-name",
                settings.service_name,
                "--otlp-endpoint",
                settings.otlp_endpoint,
            ]
        self._proc = subprocess.Popen(command, stdin=subprocess.PIPE, env=env)
        self._broken = False
        self._backlog: memoryview | None = None
        assert self._proc.stdin is not None
        self._fd = self._proc.stdin.fileno()  # written with os.write: the buffer stays unused
        os.set_blocking(self._fd, False)
        # A bigger pipe (Linux) rides out the export process's pauses (an OTLP retry).
        with contextlib.suppress(AttributeError, OSError):
            fcntl.fcntl(self._fd, fcntl.F_SETPIPE_SZ, 1 << 20)

    def ready(self) -> bool:
        return self._broken or self._backlog is None or self._write()

    def export(self, records: list[Record]) -> int:
        if self._broken or (self._backlog is not None and not self._write()):
            return len(records)
        self._backlog = memoryview(encode_records(records))
        self._write()
        return 0

    def _write(self) -> bool:
        """Write what is left of the current frame; True once it is all written."""
        view = self._backlog
        while view is not None and len(view):
            try:
                view = view[os.write(self._fd, view) :]
            except BlockingIOError:
                self._backlog = view
                return False
            except OSError as exc:
                self._broken = True
                self._backlog = None
                log.warning(
                    "the trace export process (pid %d) is gone (%s): spans are no longer exported",
                    self._proc.pid,
                    exc,
                )
                return False
        self._backlog = None
        return True

    def shutdown(self, timeout: float = 5.0) -> None:
        # Bounded: an exporter retrying an unreachable collector must not hold up a stop.
        deadline = time.monotonic() + timeout
        while self._backlog is not None and not self._write():
            left = deadline - time.monotonic()
            if left <= 0 or self._broken:
                break
            select.select([], [self._fd], [], left)
        if self._proc.stdin is not None:
            with contextlib.suppress(OSError):
                self._proc.stdin.close()
        try:
            self._proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.warning("the trace export process did not finish in %g s: killed", timeout)
            self._proc.kill()
            self._proc.wait()


def _export(exporter: SpanExporter, spans: list[ReadableSpan], limit: int = 512) -> None:
    for start in range(0, len(spans), limit):
        try:
            exporter.export(spans[start : start + limit])
        except Exception as exc:
            log.warning("trace export to %s failed: %s", type(exporter).__name__, exc)


def _check_exporter(settings: TracingSettings) -> None:
    if settings.exporter == "otlp" and not any(_importable(m) for m in OTLP_MODULES):
        raise ValueError(
            'tracing.exporter: "otlp" needs the OTLP exporter package; install '
            "opentelemetry-exporter-otlp (or set tracing.exporter to console or none)"
        )


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def _named_exporter(settings: TracingSettings) -> SpanExporter:
    if settings.exporter == "console":
        return ConsoleSpanExporter(service_name=settings.service_name)
    if settings.exporter == "memory":
        return InMemorySpanExporter()
    _check_exporter(settings)
    for name in OTLP_MODULES:
        if _importable(name):
            module: Any = importlib.import_module(name)
            if settings.otlp_endpoint:
                exporter: SpanExporter = module.OTLPSpanExporter(endpoint=settings.otlp_endpoint)
            else:
                exporter = module.OTLPSpanExporter()
            return exporter
    raise AssertionError("unreachable: _check_exporter found an OTLP module")


class _NullExporter(SpanExporter):
    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return SpanExportResult.SUCCESS


# ---- the export process ------------------------------------------------------------------------


def encode_records(records: list[Record]) -> bytes:
    """One frame for the export process: marshal (the fastest encoding of plain values, and the
    export process runs this same interpreter). A value marshal cannot carry becomes its str:
    no pickle anywhere in the server."""
    try:
        payload = marshal.dumps(records)
    except ValueError:
        payload = marshal.dumps(_plain(records))
    return _FRAME.pack(len(payload), _MARSHAL) + payload


def _plain(value: Any) -> Any:
    if value is None or isinstance(value, bool | int | float | str | bytes):
        return value
    if isinstance(value, tuple | list):
        return type(value)(_plain(v) for v in value)
    if isinstance(value, dict):
        return {_plain(k): _plain(v) for k, v in value.items()}
    return str(value)


def serve_exports(stream: IO[bytes], exporter: SpanExporter, builder: SpanBuilder) -> int:
    """Read frames of records (`encode_records`) until EOF; export their spans. Returns how
    many spans were exported."""
    read = stream.read
    exported = 0
    while True:
        header = read(_FRAME.size)
        if len(header) < _FRAME.size:
            break
        size, encoding = _FRAME.unpack(header)
        payload = read(size)
        if len(payload) < size:
            break
        # The pipe's only writer is the server process that started this one.
        if encoding != _MARSHAL:
            raise ValueError(f"unknown frame encoding {encoding}")
        records = marshal.loads(payload)
        spans: list[ReadableSpan] = []
        builder.build(records, spans)
        _export(exporter, spans)
        exported += len(spans)
    return exported


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m server.observability.tracing",
        description="batchline's trace export process: spans from stdin to an exporter",
    )
    # "null" builds the spans and drops them (benchmarks: the export process's own cost).
    parser.add_argument("--exporter", choices=("console", "otlp", "null"), required=True)
    parser.add_argument("--service-name", default="batchline")
    parser.add_argument("--otlp-endpoint", default="")
    args = parser.parse_args(argv)
    # The server stops us by closing the pipe, after its last spans: signals sent to the
    # whole process group (Ctrl-C) must not cut that short.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    exporter: SpanExporter
    if args.exporter == "null":
        exporter = _NullExporter()
    else:
        exporter = _named_exporter(
            TracingSettings(
                sampling_ratio=1.0,
                exporter=args.exporter,
                service_name=args.service_name,
                otlp_endpoint=args.otlp_endpoint,
            )
        )
    try:
        serve_exports(sys.stdin.buffer, exporter, SpanBuilder(args.service_name))
    finally:
        exporter.shutdown()
    return 0
