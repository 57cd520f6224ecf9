"""OpenTelemetry traces of the request path, recorded for a few microseconds per request.

What is traced: a SERVER span per sampled request, continued from a W3C `traceparent` (and
`tracestate`) in its gRPC metadata, with children for feature fetch, queue wait and encode; and
one span per executed batch, linked (OTel Links) to every request span it served.

Why not the SDK's Tracer on the request path (bench/observability_cost.py, µs per request for
a request span, three children and a share of a linked batch span, at 100 % sampling): through
a TracerProvider and BatchSpanProcessor ~90 µs (sampler, context look-ups, attribute copies,
processor fan-out, locks); building the SDK's ReadableSpans directly ~9 µs; OTLP-encoding them
another ~60-100 µs. A request costs ~150 µs of server CPU, and under the GIL an export *thread*
takes its time from the event loop all the same. So:

- the request path records plain values only: ids from `random.getrandbits`, times from
  `time.time_ns`, the caller's attribute dict without a copy, children as tuples, no OTel
  context attach/detach. A finished trace is appended to a bounded deque (no lock:
  `deque.append` is atomic under the GIL; when full, traces are dropped and counted, never
  waited for);
- a daemon thread drains the deque every `export_interval_s` and flattens the traces to tuples;
- for the console and OTLP exporters, it marshals them down a pipe to an export process
  (`python -m server.observability.tracing`) that builds the SDK's `ReadableSpan`s and runs the
  standard exporter there, off this process's GIL. An exporter object passed in (tests, benches)
  runs in the thread instead; "memory" exports each trace as it ends (tests see spans at once).

The export process spends its own CPU: ~12 µs per traced request to rebuild spans, ~60-100 µs
more to OTLP-encode them (~190 µs to print them). At full load and 100 % sampling it wants a
core of its own; when it falls behind, the pipe and then the queue fill, and traces are dropped
and counted (`Tracing.dropped`), never waited for.

Sampling is the SDK's ParentBased(TraceIdRatioBased(ratio)), decided inline with the SDK
sampler's own bound: a caller's sampled flag is obeyed; a new trace is kept when the low 64 bits
of its id fall under the bound. An unsampled request gets None and costs nothing more.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import fcntl
import importlib
import importlib.util
import logging
import marshal
import os
import random
import re
import select
import signal
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import IO, Any, Protocol

from opentelemetry.sdk.resources import SERVICE_NAME, SERVICE_VERSION, Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import ConsoleSpanExporter, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ParentBased, Sampler, TraceIdRatioBased
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import (
    INVALID_SPAN_ID,
    INVALID_TRACE_ID,
    Link,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
    TraceState,
    get_current_span,
)
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from server import __version__

log = logging.getLogger(__name__)

EXPORTERS = ("none", "console", "otlp", "memory")
OTLP_MODULES = (
    "opentelemetry.exporter.otlp.proto.grpc.trace_exporter",
    "opentelemetry.exporter.otlp.proto.http.trace_exporter",
)
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

# Version 00, lower-case hex, nothing around it: the common case, parsed here. Anything else
# goes to the SDK's propagator, which applies the rest of the W3C rules.
_TRACEPARENT_00 = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
_SAMPLED = 0x01
_RANDOM_TRACE_ID = 0x02
_LOW_64 = (1 << 64) - 1
_UNSET = Status(StatusCode.UNSET)
_REQUEST = 0
_BATCH = 1
_FRAME = struct.Struct("!IB")  # payload size, encoding
_MARSHAL = 0
_time_ns = time.time_ns
_getrandbits = random.getrandbits


@dataclass(frozen=True, slots=True)
class TracingSettings:
    """`[tracing]`: which requests are traced and where their spans go."""

    sampling_ratio: float = 0.0
    exporter: str = "none"  # none | console | otlp | memory
    service_name: str = "batchline"
    otlp_endpoint: str = ""  # empty: the exporter's default (OTEL_EXPORTER_OTLP_* or localhost)
    max_pending: int = 65536  # finished traces and batches waiting for the export thread
    export_interval_s: float = 0.2
    # console/otlp: encode and send in a separate process (off the server's GIL).
    export_process: bool = True

    def __post_init__(self) -> None:
        if not 0.0 <= self.sampling_ratio <= 1.0:
            raise ValueError(
                f"tracing.sampling_ratio: expected a number in [0, 1], got {self.sampling_ratio!r}"
            )
        if self.exporter not in EXPORTERS:
            raise ValueError(
                f"tracing.exporter: expected one of {', '.join(EXPORTERS)}, got {self.exporter!r}"
            )
        if self.max_pending < 1:
            raise ValueError(f"tracing.max_pending: expected >= 1, got {self.max_pending!r}")
        if self.export_interval_s <= 0:
            raise ValueError(
                f"tracing.export_interval_s: expected > 0, got {self.export_interval_s!r}"
            )


class RequestTrace:
    """One sampled request's span while it is being served.

    Cheap by construction: `child` appends a tuple, `set_attribute` writes a dict, `end` stamps
    the time and queues the trace for export. The attributes given to `start_request` are kept
    without a copy and never changed (pass one prebuilt dict per model version);
    `set_attribute` writes to a dict of this request's own. Nothing here touches the OTel
    context, so nothing needs attaching or detaching around awaits.
    """

    __slots__ = (
        "_context",
        "_extra",
        "_submit",
        "attributes",
        "children",
        "end_ns",
        "message",
        "name",
        "parent_id",
        "span_id",
        "start_ns",
        "status",
        "trace_flags",
        "trace_id",
        "trace_state",
    )

    def __init__(
        self,
        submit: Callable[[RequestTrace | _BatchRecord], None],
        name: str,
        trace_id: int,
        span_id: int,
        parent_id: int,
        trace_flags: int,
        trace_state: str | None,
        attributes: Attributes | None,
        start_ns: int,
    ) -> None:
        self._submit = submit
        self._context: SpanContext | None = None
        self._extra: dict[str, AttributeValue] | None = None
        self.name = name
        self.trace_id = trace_id
        self.span_id = span_id
        self.parent_id = parent_id  # 0: the request started a new trace
        self.trace_flags = trace_flags
        self.trace_state = trace_state  # the caller's raw `tracestate`, parsed off the hot path
        self.attributes = attributes
        self.start_ns = start_ns
        self.end_ns = 0
        self.children: list[tuple[str, int, int, Attributes | None]] = []
        self.status = "OK"
        self.message = ""

    def child(
        self, name: str, start_ns: int, end_ns: int, attributes: Attributes | None = None
    ) -> None:
        """Record a finished child span (epoch nanoseconds; see `Tracing.epoch_ns`)."""
        self.children.append((name, start_ns, end_ns, attributes))

    def set_attribute(self, key: str, value: AttributeValue) -> None:
        extra = self._extra
        if extra is None:
            self._extra = {key: value}
        else:
            extra[key] = value

    def end(self, status_code: str = "OK", message: str = "") -> None:
        """Finish the span with a gRPC status name; any status but OK marks it ERROR. Once."""
        if self.end_ns:
            return
        self.end_ns = _time_ns()
        self.status = status_code
        self.message = message
        self._submit(self)

    @property
    def span_context(self) -> SpanContext:
        """This span's context, for links (built on first use)."""
        context = self._context
        if context is None:
            context = self._context = SpanContext(
                self.trace_id,
                self.span_id,
                False,
                TraceFlags(self.trace_flags),
                _trace_state(self.trace_state),
            )
        return context

    def _record(self) -> Record:
        return (
            _REQUEST,
            self.name,
            self.trace_id,
            self.span_id,
            self.parent_id,
            self.trace_flags,
            self.trace_state,
            self.attributes,
            self._extra,
            self.start_ns,
            self.end_ns,
            self.status,
            self.message,
            self.children,
        )


class _BatchRecord:
    __slots__ = ("end_ns", "model", "ok", "requests", "rows", "start_ns", "version")

    def __init__(
        self,
        model: str,
        version: str,
        rows: int,
        start_ns: int,
        end_ns: int,
        ok: bool,
        requests: list[RequestTrace],
    ) -> None:
        self.model = model
        self.version = version
        self.rows = rows
        self.start_ns = start_ns
        self.end_ns = end_ns
        self.ok = ok
        self.requests = requests

    def _record(self) -> Record:
        return (
            _BATCH,
            self.model,
            self.version,
            self.rows,
            self.start_ns,
            self.end_ns,
            self.ok,
            [(r.trace_id, r.span_id, r.trace_flags, r.trace_state) for r in self.requests],
        )


class _Sink(Protocol):
    def ready(self) -> bool:
        """Whether `export` would take records now."""
        ...

    def export(self, records: list[Record]) -> int:
        """Hand records on without blocking for long; return how many were dropped."""
        ...

    def shutdown(self, timeout: float) -> None: ...


class Tracing:
    """The server's tracer: decides sampling, records spans cheaply, exports off the hot path.

    A disabled Tracing (ratio 0 or exporter "none") answers `start_request` with None and
    records nothing; a caller that keeps None instead of a disabled Tracing pays not even that.
    """

    def __init__(
        self,
        sink: _Sink | None,
        *,
        sampling_ratio: float = 0.0,
        exporter: SpanExporter | None = None,
        synchronous: bool = False,
        max_pending: int = 65536,
        export_interval_s: float = 0.2,
        max_export_batch: int = 512,
    ) -> None:
        self.enabled = sink is not None and sampling_ratio > 0.0
        self.exporter = exporter  # the in-process exporter, if any (tests read spans from it)
        self.sampler: Sampler = ParentBased(TraceIdRatioBased(sampling_ratio))
        self._bound = TraceIdRatioBased(sampling_ratio).bound
        # Two counters, each written by one thread only (a shared += could lose counts).
        self._dropped_full = 0  # the request path: the queue was full
        self._dropped_export = 0  # the export side: the sink refused, or shutdown left them
        self._dropped_logged = 0
        self._sink = sink
        self._max_pending = max_pending
        self._max_export_batch = max_export_batch
        self._interval = export_interval_s
        self._pending: collections.deque[RequestTrace | _BatchRecord] = collections.deque()
        self._export_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._epoch_offset_ns = _time_ns() - time.monotonic_ns()
        self._propagator = TraceContextTextMapPropagator()
        self._submit: Callable[[RequestTrace | _BatchRecord], None] = (
            self._export_now if synchronous else self._enqueue
        )
        if self.enabled and not synchronous:
            self._thread = threading.Thread(
                target=self._run, name="batchline-trace-export", daemon=True
            )
            self._thread.start()

    @classmethod
    def from_settings(
        cls, settings: TracingSettings, *, exporter: SpanExporter | None = None
    ) -> Tracing:
        """The Tracing `settings` ask for; `exporter` replaces the named one (tests, benches).

        "memory" exports each trace as it ends; an exporter object runs in the export thread;
        "console" and "otlp" run in an export process (unless `export_process` is false).
        "otlp" needs the opentelemetry-exporter-otlp package: without it, a ValueError.
        """
        if settings.sampling_ratio == 0.0 or (exporter is None and settings.exporter == "none"):
            return cls.disabled()
        sink: _Sink
        if exporter is None and settings.export_process and settings.exporter != "memory":
            _check_exporter(settings)
            sink = _ProcessSink(settings)
        else:
            exporter = exporter or _named_exporter(settings)
            sink = _ExporterSink(exporter, SpanBuilder(settings.service_name))
        return cls(
            sink,
            sampling_ratio=settings.sampling_ratio,
            exporter=exporter,
            synchronous=settings.exporter == "memory",
            max_pending=settings.max_pending,
            export_interval_s=settings.export_interval_s,
        )

    @classmethod
    def disabled(cls) -> Tracing:
        return cls(None)

    # ---- the request path -----------------------------------------------------------------

    def start_request(
        self,
        name: str,
        metadata: Iterable[tuple[str, str | bytes]] | None,
        attributes: Attributes | None = None,
        start_ns: int | None = None,
    ) -> RequestTrace | None:
        """A SERVER span for one request, continuing the caller's trace; None if not sampled.

        `metadata` is the call's gRPC metadata (`context.invocation_metadata()`: lower-case
        keys); `attributes` is kept, not copied, and never changed.
        """
        if not self.enabled:
            return None
        traceparent: str | bytes | None = None
        tracestate: str | bytes | None = None
        if metadata:
            for key, value in metadata:
                if key == "traceparent":
                    traceparent = value
                elif key == "tracestate":
                    tracestate = value
        parent = None if traceparent is None else self._parse_parent(traceparent, tracestate)
        if parent is None:
            trace_id = _getrandbits(128)
            while trace_id == INVALID_TRACE_ID:
                trace_id = _getrandbits(128)
            if trace_id & _LOW_64 >= self._bound:
                return None
            parent_id = 0
            flags = _SAMPLED | _RANDOM_TRACE_ID
            state = None
        else:
            trace_id, parent_id, parent_flags, state = parent
            if not parent_flags & _SAMPLED:
                return None
            flags = _SAMPLED | (parent_flags & _RANDOM_TRACE_ID)
        span_id = _getrandbits(64)
        while span_id == INVALID_SPAN_ID:
            span_id = _getrandbits(64)
        return RequestTrace(
            self._submit,
            name,
            trace_id,
            span_id,
            parent_id,
            flags,
            state,
            attributes,
            _time_ns() if start_ns is None else start_ns,
        )

    def record_batch(
        self,
        model: str,
        version: str,
        rows: int,
        start_ns: int,
        end_ns: int,
        ok: bool,
        requests: Sequence[RequestTrace | None],
    ) -> None:
        """One span for an executed batch, linked to each sampled request it served.

        A batch that served no sampled request is not recorded, so a sampling ratio thins
        batch spans too, and every kept request can reach its batch.
        """
        if not self.enabled:
            return
        linked = [r for r in requests if r is not None]
        if linked:
            self._submit(_BatchRecord(model, version, rows, start_ns, end_ns, ok, linked))

    @property
    def dropped(self) -> int:
        """Finished traces (and batch records) that were never exported."""
        return self._dropped_full + self._dropped_export

    def epoch_ns(self, clock_seconds: float) -> int:
        """A monotonic clock reading (server.clock.MonotonicClock) as epoch nanoseconds."""
        return int(clock_seconds * 1e9) + self._epoch_offset_ns

    # ---- export ---------------------------------------------------------------------------

    def force_flush(self) -> bool:
        """Hand what was recorded so far to the exporter, on this thread, as far as it takes it
        now (an export process that is behind takes the rest later). True if all was taken."""
        return self._drain()

    def shutdown(self, timeout: float = 5.0) -> None:
        """Stop recording, export what is pending (for at most about `timeout` seconds while
        the exporter is behind; the rest is dropped), stop the exporter and its process."""
        if self._closed:
            return
        self._closed = True
        self.enabled = False
        deadline = time.monotonic() + timeout
        if self._thread is not None:
            self._stop.set()
            self._thread.join(timeout=timeout)
        while not self._drain() and time.monotonic() < deadline:
            time.sleep(0.01)
        self._dropped_export += len(self._pending)
        self._pending.clear()
        if self._sink is not None:
            self._sink.shutdown(max(0.5, deadline - time.monotonic()))

    def _enqueue(self, item: RequestTrace | _BatchRecord) -> None:
        pending = self._pending
        if len(pending) < self._max_pending:
            pending.append(item)
        else:
            self._dropped_full += 1

    def _export_now(self, item: RequestTrace | _BatchRecord) -> None:
        if self._sink is not None:
            with self._export_lock:
                self._dropped_export += self._sink.export([item._record()])

    def _run(self) -> None:
        caught_up = True
        # While the exporter is behind, look again soon rather than a whole interval later.
        while not self._stop.wait(self._interval if caught_up else 0.01):
            try:
                caught_up = self._drain()
            except Exception:  # the export thread must outlive a bad span or exporter
                log.exception("trace export failed")

    def _drain(self) -> bool:
        """Hand pending traces on while the sink takes them; True when none are left."""
        sink = self._sink
        if sink is None:
            return True
        with self._export_lock:
            pending = self._pending
            limit = self._max_export_batch
            # What the sink can't take now stays queued; only a full queue drops traces.
            while pending and sink.ready():
                popleft = pending.popleft
                records = [popleft()._record() for _ in range(min(limit, len(pending)))]
                self._dropped_export += sink.export(records)
            dropped = self.dropped
            if dropped != self._dropped_logged:
                log.warning(
                    "tracing dropped %d finished traces: the exporter fell behind (queue "
                    "tracing.max_pending %d)",
                    dropped - self._dropped_logged,
                    self._max_pending,
                )
                self._dropped_logged = dropped
            return not pending

    def _parse_parent(
        self, traceparent: str | bytes, tracestate: str | bytes | None
    ) -> tuple[int, int, int, str | None] | None:
        """(trace id, parent span id, flags, raw tracestate) of a valid traceparent, else None."""
        if isinstance(traceparent, bytes):
            traceparent = traceparent.decode("ascii", "replace")
        if isinstance(tracestate, bytes):
            tracestate = tracestate.decode("ascii", "replace")
        match = _TRACEPARENT_00.fullmatch(traceparent)
        if match is not None:
            trace_id = int(match.group(1), 16)
            span_id = int(match.group(2), 16)
            if trace_id == INVALID_TRACE_ID or span_id == INVALID_SPAN_ID:
                return None
            return trace_id, span_id, int(match.group(3), 16), tracestate
        carrier = {"traceparent": traceparent}
        if tracestate is not None:
            carrier["tracestate"] = tracestate
        context = get_current_span(self._propagator.extract(carrier)).get_span_context()
        if not context.is_valid:
            return None
        return context.trace_id, context.span_id, int(context.trace_flags), tracestate


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
        package_root = str(Path(__file__).resolve().parents[2])
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


def _span_id() -> int:
    span_id = _getrandbits(64)
    while span_id == INVALID_SPAN_ID:
        span_id = _getrandbits(64)
    return span_id


def _trace_id() -> int:
    trace_id = _getrandbits(128)
    while trace_id == INVALID_TRACE_ID:
        trace_id = _getrandbits(128)
    return trace_id


@lru_cache(maxsize=256)
def _trace_state(raw: str | None) -> TraceState | None:
    return TraceState.from_header([raw]) if raw else None


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


if __name__ == "__main__":
    sys.exit(main())
