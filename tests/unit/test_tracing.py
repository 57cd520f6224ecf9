"""Request and batch spans: W3C continuation, explicit child times, batch links, sampling."""

from __future__ import annotations

import io
import json
import random
import sys
import time
from collections.abc import Iterator
from fractions import Fraction

import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import TraceIdRatioBased
from opentelemetry.trace import SpanKind, StatusCode, get_current_span
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from server.observability.tracing import (
    RequestTrace,
    SpanBuilder,
    Tracing,
    TracingSettings,
    _ProcessSink,
    encode_records,
    serve_exports,
)
from server.observability.tracing import export as export_module
from server.observability.tracing import recorder as recorder_module

TRACE_ID = 0x0AF7651916CD43DD8448EB211C80319C
PARENT_ID = 0xB7AD6B7169203331
TRACEPARENT = f"00-{TRACE_ID:032x}-{PARENT_ID:016x}-01"
ATTRIBUTES = {"rpc.system": "grpc", "batchline.model": "churn"}


@pytest.fixture
def traced() -> Iterator[Tracing]:
    tracing = Tracing.from_settings(
        TracingSettings(sampling_ratio=1.0, exporter="memory"), exporter=InMemorySpanExporter()
    )
    yield tracing
    tracing.shutdown()


def finished(tracing: Tracing) -> list[ReadableSpan]:
    assert isinstance(tracing.exporter, InMemorySpanExporter)
    return list(tracing.exporter.get_finished_spans())


def start(tracing: Tracing, *metadata: tuple[str, str]) -> RequestTrace:
    trace = tracing.start_request("ModelInfer", metadata, ATTRIBUTES)
    assert trace is not None
    return trace


def test_request_span_continues_the_callers_traceparent(traced: Tracing) -> None:
    trace = start(traced, ("user-agent", "grpc-python"), ("traceparent", TRACEPARENT))
    trace.end("OK")
    (span,) = finished(traced)
    assert span.name == "ModelInfer"
    assert span.kind is SpanKind.SERVER
    assert span.context is not None
    assert span.context.trace_id == TRACE_ID
    assert span.context.span_id != PARENT_ID
    assert span.parent is not None
    assert span.parent.span_id == PARENT_ID
    assert span.parent.is_remote
    assert span.attributes is not None
    assert span.attributes["batchline.model"] == "churn"
    assert span.attributes["rpc.grpc.status_code"] == 0
    assert span.status.status_code is StatusCode.UNSET


def test_tracestate_travels_with_the_trace(traced: Tracing) -> None:
    trace = start(traced, ("traceparent", TRACEPARENT), ("tracestate", "vendor=abc,other=1"))
    trace.end()
    (span,) = finished(traced)
    assert span.context is not None
    assert dict(span.context.trace_state) == {"vendor": "abc", "other": "1"}


def test_a_request_without_traceparent_starts_a_new_trace(traced: Tracing) -> None:
    trace = start(traced, ("user-agent", "grpc-python"))
    trace.end()
    (span,) = finished(traced)
    assert span.parent is None
    assert span.context is not None
    assert span.context.trace_id == trace.trace_id != 0
    assert span.context.trace_flags.sampled


def test_children_have_their_explicit_times_and_the_request_as_parent(traced: Tracing) -> None:
    trace = start(traced, ("traceparent", TRACEPARENT))
    trace.child("feature_fetch", 1_000, 2_000, {"rows": 3})
    trace.child("queue_wait", 2_000, 2_500)
    trace.child("encode", 3_000, 3_100)
    trace.end()
    spans = {s.name: s for s in finished(traced)}
    request = spans.pop("ModelInfer")
    assert request.context is not None
    assert [(s.name, s.start_time, s.end_time) for s in spans.values()] == [
        ("feature_fetch", 1_000, 2_000),
        ("queue_wait", 2_000, 2_500),
        ("encode", 3_000, 3_100),
    ]
    for child in spans.values():
        assert child.parent == request.context
        assert child.context is not None
        assert child.context.trace_id == TRACE_ID
        assert child.kind is SpanKind.INTERNAL
    assert spans["feature_fetch"].attributes == {"rows": 3}


def test_batch_span_links_to_each_request_span_it_served(traced: Tracing) -> None:
    first = start(traced, ("traceparent", TRACEPARENT))
    second = start(traced)
    traced.record_batch("churn", "3", 5, 10_000, 20_000, True, [first, None, second])
    first.end()
    second.end()
    (batch,) = [s for s in finished(traced) if s.name == "batch"]
    assert [link.context for link in batch.links] == [first.span_context, second.span_context]
    assert (batch.start_time, batch.end_time) == (10_000, 20_000)
    assert batch.attributes == {
        "batchline.model": "churn",
        "batchline.model_version": "3",
        "batchline.batch.rows": 5,
        "batchline.batch.requests": 2,
    }
    request_ids = {s.context.span_id for s in finished(traced) if s.name == "ModelInfer"}
    assert {link.context.span_id for link in batch.links} == request_ids


def test_a_batch_that_served_no_sampled_request_is_not_recorded(traced: Tracing) -> None:
    traced.record_batch("churn", "3", 2, 1, 2, True, [None, None])
    assert finished(traced) == []


def test_unsampled_caller_gets_none_and_nothing_is_exported(traced: Tracing) -> None:
    unsampled = f"00-{TRACE_ID:032x}-{PARENT_ID:016x}-00"
    assert traced.start_request("ModelInfer", [("traceparent", unsampled)], ATTRIBUTES) is None
    traced.record_batch("churn", "3", 1, 1, 2, True, [None])
    assert finished(traced) == []


def test_ratio_sampling_returns_none_for_dropped_requests() -> None:
    tracing = Tracing.from_settings(TracingSettings(sampling_ratio=1e-12, exporter="memory"))
    assert all(tracing.start_request("ModelInfer", (), None) is None for _ in range(1000))
    assert finished(tracing) == []
    tracing.shutdown()


@pytest.mark.parametrize("ratio", [0.001, 0.3, 0.5, 0.999])
def test_sampling_decisions_are_the_sdk_samplers(
    ratio: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    """New traces are kept exactly when the SDK's TraceIdRatioBased would keep them."""
    sdk = TraceIdRatioBased(ratio)
    tracing = Tracing.from_settings(TracingSettings(sampling_ratio=ratio, exporter="memory"))
    rng = random.Random(7)
    for _ in range(2000):
        trace_id = rng.getrandbits(128) or 1
        ids = iter([trace_id, rng.getrandbits(64) or 1])
        monkeypatch.setattr(recorder_module, "_getrandbits", lambda bits, ids=ids: next(ids))
        ours = tracing.start_request("ModelInfer", (), None) is not None
        assert ours == sdk.should_sample(None, trace_id, "ModelInfer").decision.is_sampled()
    tracing.shutdown()


@pytest.mark.parametrize(
    "settings",
    [
        TracingSettings(sampling_ratio=0.0, exporter="memory"),
        TracingSettings(sampling_ratio=1.0, exporter="none"),
    ],
)
def test_disabled_tracing_records_nothing(settings: TracingSettings) -> None:
    tracing = Tracing.from_settings(settings)
    assert not tracing.enabled
    assert tracing.start_request("ModelInfer", [("traceparent", TRACEPARENT)], {}) is None
    tracing.record_batch("churn", "3", 1, 1, 2, True, [None])
    tracing.force_flush()
    tracing.shutdown()
    assert tracing.exporter is None


def test_a_failed_request_has_error_status(traced: Tracing) -> None:
    trace = start(traced)
    trace.end("RESOURCE_EXHAUSTED", "queue for model churn is full")
    (span,) = finished(traced)
    assert span.status.status_code is StatusCode.ERROR
    assert span.status.description == "RESOURCE_EXHAUSTED: queue for model churn is full"
    assert span.attributes is not None
    assert span.attributes["rpc.grpc.status_code"] == 8


def test_a_failed_batch_has_error_status(traced: Tracing) -> None:
    trace = start(traced)
    traced.record_batch("churn", "3", 1, 1, 2, False, [trace])
    (batch,) = finished(traced)
    assert batch.status.status_code is StatusCode.ERROR


def test_end_twice_exports_once(traced: Tracing) -> None:
    trace = start(traced)
    trace.end()
    trace.end("INTERNAL")
    (span,) = finished(traced)
    assert span.status.status_code is StatusCode.UNSET


def test_set_attribute_never_changes_the_shared_attributes(traced: Tracing) -> None:
    shared = dict(ATTRIBUTES)
    trace = traced.start_request("ModelInfer", (), shared)
    assert trace is not None
    trace.set_attribute("batchline.rows", 4)
    trace.end()
    assert shared == ATTRIBUTES
    (span,) = finished(traced)
    assert span.attributes is not None
    assert span.attributes["batchline.rows"] == 4


@pytest.mark.parametrize(
    "header",
    [
        TRACEPARENT,
        TRACEPARENT.upper(),
        f"  {TRACEPARENT}  ",
        f"01-{TRACE_ID:032x}-{PARENT_ID:016x}-01-future",
        f"00-{TRACE_ID:032x}-{PARENT_ID:016x}-01-extra",
        f"ff-{TRACE_ID:032x}-{PARENT_ID:016x}-01",
        f"00-{0:032x}-{PARENT_ID:016x}-01",
        f"00-{TRACE_ID:032x}-{0:016x}-01",
        f"00-{TRACE_ID:032x}-{PARENT_ID:016x}-03",
        "00-xyz",
        "",
    ],
)
def test_traceparent_parsing_agrees_with_the_sdk_propagator(header: str) -> None:
    tracing = Tracing.disabled()
    ours = tracing._parse_parent(header, None)
    context = get_current_span(
        TraceContextTextMapPropagator().extract({"traceparent": header})
    ).get_span_context()
    if context.is_valid:
        assert ours == (context.trace_id, context.span_id, int(context.trace_flags), None)
    else:
        assert ours is None


def test_metadata_values_may_be_bytes(traced: Tracing) -> None:
    trace = traced.start_request("ModelInfer", [("traceparent", TRACEPARENT.encode())], None)
    assert trace is not None
    assert trace.trace_id == TRACE_ID


def test_export_thread_delivers_spans_on_flush() -> None:
    exporter = InMemorySpanExporter()
    tracing = Tracing.from_settings(
        TracingSettings(sampling_ratio=1.0, exporter="console", export_interval_s=60.0),
        exporter=exporter,
    )
    trace = start(tracing)
    trace.child("encode", 1, 2)
    trace.end()
    assert exporter.get_finished_spans() == ()  # nothing on the request path
    tracing.force_flush()
    assert [s.name for s in exporter.get_finished_spans()] == ["ModelInfer", "encode"]
    tracing.shutdown()


def test_shutdown_exports_what_is_pending() -> None:
    exporter = InMemorySpanExporter()
    tracing = Tracing.from_settings(
        TracingSettings(sampling_ratio=1.0, exporter="console", export_interval_s=60.0),
        exporter=exporter,
    )
    start(tracing).end()
    tracing.shutdown()
    assert [s.name for s in exporter.get_finished_spans()] == ["ModelInfer"]


def test_a_full_export_queue_drops_and_counts() -> None:
    exporter = InMemorySpanExporter()
    tracing = Tracing.from_settings(
        TracingSettings(
            sampling_ratio=1.0, exporter="console", export_interval_s=60.0, max_pending=2
        ),
        exporter=exporter,
    )
    for _ in range(3):
        start(tracing).end()
    assert tracing.dropped == 1
    tracing.shutdown()
    assert len(exporter.get_finished_spans()) == 2


def test_export_process_protocol_round_trips_records() -> None:
    """What the server sends down the pipe becomes the same spans in the export process."""
    trace = RequestTrace(
        lambda item: None, "ModelInfer", TRACE_ID, 7, PARENT_ID, 1, None, ATTRIBUTES, 10
    )
    trace.child("encode", 11, 12)
    trace.end_ns = 20
    odd = RequestTrace(
        lambda item: None,
        "ModelInfer",
        TRACE_ID,
        8,
        0,
        1,
        None,
        {"n": Fraction(1, 2)},
        10,  # type: ignore[dict-item]
    )
    odd.end_ns = 20  # an attribute value marshal cannot encode travels as its str (no pickle)
    stream = io.BytesIO(
        encode_records([trace._record()]) + encode_records([odd._record(), trace._record()])
    )
    exporter = InMemorySpanExporter()
    assert serve_exports(stream, exporter, SpanBuilder("batchline")) == 5
    spans = exporter.get_finished_spans()
    assert [s.name for s in spans] == ["ModelInfer", "encode", "ModelInfer", "ModelInfer", "encode"]
    assert spans[2].attributes is not None
    assert spans[2].attributes["n"] == "1/2"
    assert spans[0].parent is not None
    assert spans[0].parent.span_id == PARENT_ID
    assert spans[0].resource.attributes["service.name"] == "batchline"


def test_console_exporter_runs_in_an_export_process(capfd: pytest.CaptureFixture[str]) -> None:
    tracing = Tracing.from_settings(
        TracingSettings(sampling_ratio=1.0, exporter="console", service_name="svc-under-test")
    )
    assert tracing.exporter is None  # nothing exports in this process
    trace = start(tracing, ("traceparent", TRACEPARENT))
    trace.end()
    tracing.shutdown()
    out = capfd.readouterr().out
    span = json.loads(out[: out.index("\n}") + 2])
    assert span["name"] == "ModelInfer"
    assert span["context"]["trace_id"] == f"0x{TRACE_ID:032x}"
    assert span["resource"]["attributes"]["service.name"] == "svc-under-test"


def test_a_stalled_export_process_costs_dropped_traces_not_waiting() -> None:
    """The pipe never blocks the export thread; shutdown kills a stuck process in bounded time."""
    stalled = [sys.executable, "-c", "import time; time.sleep(60)"]
    sink = _ProcessSink(TracingSettings(), command=stalled)
    tracing = Tracing(sink, sampling_ratio=1.0, export_interval_s=60.0, max_pending=10_000)
    for _ in range(100):
        for _ in range(500):
            start(tracing).end()
        tracing.force_flush()
    assert not tracing.force_flush()  # the pipe is full: the rest waits in the queue
    assert tracing.dropped > 0  # and what the queue can't hold is dropped
    began = time.monotonic()
    tracing.shutdown(timeout=0.5)
    assert time.monotonic() - began < 5.0
    assert not tracing._pending


def test_otlp_without_the_exporter_package_is_a_clear_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(export_module, "_importable", lambda module: False)
    with pytest.raises(ValueError, match=r"tracing\.exporter.*opentelemetry-exporter-otlp"):
        Tracing.from_settings(TracingSettings(sampling_ratio=1.0, exporter="otlp"))


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"sampling_ratio": 1.5}, "tracing.sampling_ratio"),
        ({"exporter": "jaeger"}, "tracing.exporter"),
        ({"max_pending": 0}, "tracing.max_pending"),
    ],
)
def test_bad_settings_name_the_key(kwargs: dict[str, object], key: str) -> None:
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        TracingSettings(**kwargs)  # type: ignore[arg-type]


def test_epoch_ns_maps_the_monotonic_clock_to_wall_time() -> None:
    tracing = Tracing.disabled()
    assert abs(tracing.epoch_ns(time.monotonic()) - time.time_ns()) < 50_000_000
