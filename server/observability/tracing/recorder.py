"""The request path's recorder: `Tracing` decides sampling and records spans as plain values
(`RequestTrace` per sampled request, a batch record per executed batch), queues finished
traces without a lock and drains them to a sink from a daemon thread.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence

from opentelemetry.sdk.trace.export import SpanExporter
from opentelemetry.sdk.trace.sampling import ParentBased, Sampler, TraceIdRatioBased
from opentelemetry.trace import INVALID_SPAN_ID, INVALID_TRACE_ID, SpanContext, TraceFlags
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from server.observability.tracing.export import (
    _BATCH,
    _REQUEST,
    Attributes,
    AttributeValue,
    Record,
    SpanBuilder,
    _check_exporter,
    _ExporterSink,
    _named_exporter,
    _ProcessSink,
    _Sink,
)
from server.observability.tracing.propagation import (
    _RANDOM_TRACE_ID,
    _SAMPLED,
    ParentParser,
    _getrandbits,
    _trace_state,
)
from server.observability.tracing.settings import TracingSettings

log = logging.getLogger(__name__)

_LOW_64 = (1 << 64) - 1
_time_ns = time.time_ns


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


class Tracing(ParentParser):
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
        requests: Sequence[object],
    ) -> None:
        """One span for an executed batch, linked to each sampled request it served.

        A batch that served no sampled request is not recorded, so a sampling ratio thins
        batch spans too, and every kept request can reach its batch.
        """
        if not self.enabled:
            return
        linked = [r for r in requests if isinstance(r, RequestTrace)]
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
