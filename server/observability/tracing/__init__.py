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

The parts: `settings` (`[tracing]`), `recorder` (the request path: `Tracing`,
`RequestTrace`), `propagation` (the W3C trace context, ids), `export` (records -> spans, the
sinks, the export process).
"""

from __future__ import annotations

from server.observability.tracing.export import (
    GRPC_STATUS_CODES,
    Attributes,
    AttributeValue,
    Record,
    SpanBuilder,
    encode_records,
    main,
    serve_exports,
)

# Private, re-exported for the tests and bench/observability_cost.py, which drive the pipe.
from server.observability.tracing.export import _ProcessSink as _ProcessSink
from server.observability.tracing.propagation import ParentParser
from server.observability.tracing.recorder import RequestTrace, Tracing
from server.observability.tracing.settings import EXPORTERS, OTLP_MODULES, TracingSettings

__all__ = [
    "EXPORTERS",
    "GRPC_STATUS_CODES",
    "OTLP_MODULES",
    "AttributeValue",
    "Attributes",
    "ParentParser",
    "Record",
    "RequestTrace",
    "SpanBuilder",
    "Tracing",
    "TracingSettings",
    "encode_records",
    "main",
    "serve_exports",
]
