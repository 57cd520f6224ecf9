"""`python -m bench.observability_cost`: what metrics and tracing cost on the request path.

In process, no network: a real App (churn@production, metrics port off) and its servicer's
`_infer` driven with 64 concurrent requests per loop tick, as the gRPC server would; the time
per request is the server's CPU per request on the path the loop runs (client and wire left
out). Variants, interleaved round by round so the noise of a shared machine spreads evenly:

- metrics on (as served) / stats only / null observer (metrics and Triton statistics off);
- tracing at 100 % sampling, as `server.observability.tracing` would be wired: a request span
  continued from a traceparent, three children (feature fetch, queue wait, encode), a batch
  span per tick linked to its 64 requests; exporting through the export process (console, to
  /dev/null), or in this process's export thread (null exporter: building spans only; plus
  OTLP encoding when opentelemetry-exporter-otlp is installed), or through the plain SDK
  (`Tracer.start_span` with a BatchSpanProcessor) for comparison.

The measure is this process's CPU per request (every thread, not the export process's, which
is reported apart): a CPU-bound server's req/s follows it. Wall time is printed too, but a
round ends with a flush that waits for the export process to take its spans.

Then micro-benchmarks of the calls alone: tracing's per-request calls, the SDK equivalent, and
the ModelObserver calls. Writes bench/results/observability_cost.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bench.processes import cpu_seconds
from server._proto import inference_pb2 as pb
from server.api.servicer import InferenceServicer
from server.app import App
from server.config import load_settings
from server.observability.tracing import (
    RequestTrace,
    Tracing,
    TracingSettings,
    _ProcessSink,
    encode_records,
)

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
CONCURRENCY = 64
TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
METADATA = (("user-agent", "grpc-python/1.81.1 grpc-c/50.0.0 (linux; chttp2)"),)
TRACED_METADATA = (*METADATA, ("traceparent", TRACEPARENT))
ATTRIBUTES: dict[str, Any] = {
    "rpc.system": "grpc",
    "rpc.service": "inference.GRPCInferenceService",
    "rpc.method": "ModelInfer",
    "batchline.model": "churn",
    "batchline.model_version": "1",
}


class NullObserver:
    """Neither metrics nor statistics."""

    def request_done(self, seconds: float, status: str, protocol: str = "grpc") -> None:
        pass

    def batch_done(
        self, rows: int, queue_waits: Sequence[float], compute_s: float, ok: bool
    ) -> None:
        pass

    def fallback(self, kind: str) -> None:
        pass

    def dropped(self, reason: str, count: int) -> None:
        pass


class StatsOnlyObserver(NullObserver):
    """Triton's ModelStatistics counters, no Prometheus metrics."""

    def __init__(self, stats: Any) -> None:
        self.stats = stats

    def request_done(self, seconds: float, status: str, protocol: str = "grpc") -> None:
        self.stats.request_done(seconds, status == "OK")

    def batch_done(
        self, rows: int, queue_waits: Sequence[float], compute_s: float, ok: bool
    ) -> None:
        self.stats.batch_done(rows, queue_waits, compute_s, ok)


class DiscardSink:
    """Takes the export thread's records and drops them: the request path's share alone."""

    def ready(self) -> bool:
        return True

    def export(self, records: list[Any]) -> int:
        return 0

    def shutdown(self, timeout: float) -> None:
        pass


class NullExporter:
    def export(self, spans: Sequence[Any]) -> Any:
        from opentelemetry.sdk.trace.export import SpanExportResult

        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


def otlp_encoding_exporter() -> Any | None:
    """An exporter that OTLP-encodes and serializes (no network), if the package is here."""
    try:
        from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
    except ImportError:
        return None

    class OtlpEncodeOnly(NullExporter):
        def export(self, spans: Sequence[Any]) -> Any:
            encode_spans(spans).SerializeToString()
            return super().export(spans)

    return OtlpEncodeOnly()


# ---- the request path, in process ------------------------------------------------------------


class Variant:
    def __init__(
        self,
        name: str,
        *,
        observer: str = "metrics",
        tracing: Callable[[], Tracing] | None = None,
        sdk: bool = False,
    ) -> None:
        self.name = name
        self.observer = observer
        self.make_tracing = tracing
        self.sdk = sdk
        self.tracing: Tracing | None = None
        self.samples: list[float] = []  # wall seconds per request, one per round
        # CPU seconds of this process (every thread; not the export process) per request.
        self.cpu_samples: list[float] = []
        self.export_cpu_s = 0.0
        self.requests = 0
        self.dropped = 0


def ensure_registry(path: Path) -> Path:
    if not (path / "churn").exists():
        from registry_client.demo import build_demo

        print(f"building the demo registry in {path} (quick)", file=sys.stderr)
        build_demo(path, quick=True)
    return path


@contextlib.contextmanager
def stdout_to_devnull() -> Iterator[None]:
    """Processes started inside inherit /dev/null as stdout (the console exporter's output)."""
    sys.stdout.flush()
    saved = os.dup(1)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    try:
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)
        os.close(devnull)


async def request_path(
    registry: Path, rounds: int, ticks: int, variants: list[Variant]
) -> dict[str, Any]:
    settings = load_settings(
        server_overrides={
            "registry": str(registry),
            "grpc_port": 0,
            "http_port": -1,
            "metrics_port": -1,
            "host": "127.0.0.1",
        },
        model_refs=("churn@production",),
    )
    app = App(settings)
    await app.start()
    try:
        served = app.models.get("churn", "")
        servicer = InferenceServicer(app.plane, app.clock, max_tensor_elements=1 << 22)
        request = pb.ModelInferRequest(model_name="churn")
        rows = np.random.default_rng(0).normal(size=(1, 15)).astype(np.float32)
        request.inputs.add(name="input", datatype="FP32", shape=[1, 15])
        request.raw_input_contents.append(rows.tobytes())
        data = request.SerializeToString()
        observers = {
            "metrics": served.observer,
            "stats": StatsOnlyObserver(served.stats),
            "null": NullObserver(),
        }
        infer = servicer._infer
        clock = app.clock

        async def plain() -> None:
            await infer(pb.ModelInferRequest.FromString(data), 10.0)

        def traced(tracing: Tracing) -> Callable[[], Awaitable[RequestTrace | None]]:
            epoch = tracing.epoch_ns

            async def one() -> RequestTrace | None:
                trace = tracing.start_request("ModelInfer", TRACED_METADATA, ATTRIBUTES)
                began = clock.now()
                response = await infer(pb.ModelInferRequest.FromString(data), 10.0)
                ended = clock.now()
                if trace is not None:
                    # Where the real wiring records them; the times are stand-ins.
                    trace.child("feature_fetch", epoch(began), epoch(began))
                    trace.child("queue_wait", epoch(began), epoch(ended))
                    trace.child("encode", epoch(ended), epoch(ended))
                    trace.end("OK" if response is not None else "INTERNAL")
                return trace

            return one

        sdk_tracer, sdk_provider = make_sdk_tracer()

        async def sdk_one() -> Any:
            return await sdk_request(sdk_tracer, clock, infer, data)

        async def run_round(variant: Variant) -> float:
            served.observer = observers[variant.observer]  # type: ignore[assignment]
            served.batcher._observer = observers[variant.observer]  # type: ignore[assignment]
            tracing = variant.tracing
            gc.collect()
            start = time.perf_counter()
            cpu_start = time.process_time()
            if variant.sdk:
                for _ in range(ticks):
                    spans = await asyncio.gather(*(sdk_one() for _ in range(CONCURRENCY)))
                    sdk_batch(sdk_tracer, spans)
            elif tracing is not None:
                one = traced(tracing)
                record = tracing.record_batch
                now = time.time_ns
                for _ in range(ticks):
                    t0 = now()
                    traces = await asyncio.gather(*(one() for _ in range(CONCURRENCY)))
                    record("churn", "1", CONCURRENCY, t0, now(), True, traces)
            else:
                for _ in range(ticks):
                    await asyncio.gather(*(plain() for _ in range(CONCURRENCY)))
            # The export thread's share (flattening, marshalling or building spans) counts too,
            # including what waits for a busy export process to take it (CPU only, not wall).
            n = ticks * CONCURRENCY
            if variant.sdk:
                sdk_provider.force_flush()
            caught_up = tracing is None or tracing.force_flush()
            wall = (time.perf_counter() - start) / n
            give_up = time.monotonic() + 60
            while not caught_up and time.monotonic() < give_up:
                await asyncio.sleep(0.005)
                caught_up = tracing is None or tracing.force_flush()
            variant.cpu_samples.append((time.process_time() - cpu_start) / n)
            return wall

        for variant in variants:
            if variant.make_tracing is not None:
                variant.tracing = variant.make_tracing()
        for variant in variants:  # warm-up
            await run_round(variant)
        for _ in range(rounds):
            for variant in variants:
                pid = export_pid(variant.tracing)
                cpu0 = cpu_seconds(pid) if pid else 0.0
                variant.samples.append(await run_round(variant))
                variant.requests += ticks * CONCURRENCY
                if pid:
                    await asyncio.sleep(0.5)  # let the export process finish what it was sent
                    variant.export_cpu_s += cpu_seconds(pid) - cpu0
        served.observer = observers["metrics"]  # type: ignore[assignment]
        served.batcher._observer = observers["metrics"]  # type: ignore[assignment]
    finally:
        for variant in variants:
            if variant.tracing is not None:
                variant.dropped = variant.tracing.dropped
                variant.tracing.shutdown()
        sdk_provider.shutdown()
        await app.stop(grace=1.0)
    return summarize(variants)


def export_pid(tracing: Tracing | None) -> int | None:
    sink = getattr(tracing, "_sink", None)
    proc = getattr(sink, "_proc", None)
    return proc.pid if proc is not None else None


def summarize(variants: list[Variant]) -> dict[str, Any]:
    base = next(v for v in variants if v.name == "metrics on, tracing off")
    base_cpu = statistics.median(base.cpu_samples) * 1e6
    out: dict[str, Any] = {}
    for v in variants:
        us = statistics.median(v.samples) * 1e6
        cpu = statistics.median(v.cpu_samples) * 1e6
        out[v.name] = {
            "wall_us_per_request_median": round(us, 2),
            "cpu_us_per_request_median": round(cpu, 2),
            "cpu_us_per_request_min": round(min(v.cpu_samples) * 1e6, 2),
            # A CPU-bound server's req/s follows its CPU per request.
            "req_per_s_vs_baseline": round(base_cpu / cpu, 3),
            "export_process_cpu_us_per_request": round(v.export_cpu_s / v.requests * 1e6, 2)
            if v.export_cpu_s
            else None,
            "dropped_traces": v.dropped,
        }
    return out


# ---- the plain SDK, for comparison ---------------------------------------------------------


def make_sdk_tracer() -> tuple[Any, Any]:
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

    provider = TracerProvider(
        sampler=ParentBased(TraceIdRatioBased(1.0)),
        resource=Resource.create({"service.name": "batchline"}),
    )
    provider.add_span_processor(
        BatchSpanProcessor(NullExporter(), max_queue_size=1 << 16, max_export_batch_size=512)  # type: ignore[arg-type]
    )
    return provider.get_tracer("batchline"), provider


_PROPAGATOR: Any = None


def sdk_spans(tracer: Any, t0: int, t1: int) -> Any:
    global _PROPAGATOR
    from opentelemetry import trace
    from opentelemetry.trace import SpanKind
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    if _PROPAGATOR is None:
        _PROPAGATOR = TraceContextTextMapPropagator()
    context = _PROPAGATOR.extract(dict(TRACED_METADATA))
    span = tracer.start_span(
        "ModelInfer", context=context, kind=SpanKind.SERVER, attributes=ATTRIBUTES
    )
    parent = trace.set_span_in_context(span)
    for name in ("feature_fetch", "queue_wait", "encode"):
        tracer.start_span(name, context=parent, start_time=t0).end(end_time=t1)
    return span


async def sdk_request(tracer: Any, clock: Any, infer: Any, data: bytes) -> Any:
    t0 = time.time_ns()
    await infer(pb.ModelInferRequest.FromString(data), 10.0)
    span = sdk_spans(tracer, t0, time.time_ns())
    span.end()
    return span


def sdk_batch(tracer: Any, spans: Sequence[Any]) -> None:
    from opentelemetry.trace import Link

    tracer.start_span("batch", links=[Link(s.get_span_context()) for s in spans]).end()


# ---- micro-benchmarks ----------------------------------------------------------------------


def best_of(fn: Callable[[], None], n: int, repeat: int = 7) -> float:
    """Fastest of `repeat` runs, µs per call (the least disturbed by other work)."""
    fn()
    times = []
    for _ in range(repeat):
        gc.collect()
        start = time.perf_counter()
        for _ in range(n):
            fn()
        times.append(time.perf_counter() - start)
    return min(times) / n * 1e6


def micro(registry_stats: Any) -> dict[str, float]:
    out: dict[str, float] = {}
    tracing = Tracing.from_settings(
        TracingSettings(sampling_ratio=1.0, exporter="console", export_interval_s=3600),
        exporter=NullExporter(),  # type: ignore[arg-type]
    )
    batch: list[RequestTrace | None] = []
    now = time.time_ns

    def ours() -> None:
        trace = tracing.start_request("ModelInfer", TRACED_METADATA, ATTRIBUTES)
        assert trace is not None
        t = now()
        trace.child("feature_fetch", t, t + 10)
        trace.child("queue_wait", t, t + 20)
        trace.child("encode", t, t + 30)
        trace.end("OK")
        batch.append(trace)
        if len(batch) == CONCURRENCY:
            tracing.record_batch("churn", "1", CONCURRENCY, t, t + 40, True, batch)
            batch.clear()

    def hot_path() -> None:
        ours()
        if not batch:
            tracing._pending.clear()

    out["tracing: start_request + 3 children + end + 1/64 record_batch"] = best_of(hot_path, 6400)

    def ours_no_parent() -> None:
        trace = tracing.start_request("ModelInfer", METADATA, ATTRIBUTES)
        assert trace is not None
        trace.end("OK")
        tracing._pending.clear()

    out["tracing: start_request (no traceparent) + end"] = best_of(ours_no_parent, 6400)

    def drain() -> None:
        for _ in range(CONCURRENCY):
            ours()
        pending = tracing._pending
        records = [item._record() for item in pending]
        pending.clear()
        encode_records(records)

    out["tracing: hot path + export thread's flatten and marshal (per request)"] = (
        best_of(drain, 100) / CONCURRENCY
    )

    from opentelemetry.sdk.trace import ReadableSpan

    from server.observability.tracing import SpanBuilder

    builder = SpanBuilder("batchline")

    def build() -> None:
        for _ in range(CONCURRENCY):
            ours()
        pending = tracing._pending
        records = [item._record() for item in pending]
        pending.clear()
        spans: list[ReadableSpan] = []
        builder.build(records, spans)

    out["tracing: hot path + building ReadableSpans in process (per request)"] = (
        best_of(build, 100) / CONCURRENCY
    )
    otlp = otlp_encoding_exporter()
    if otlp is not None:

        def encode() -> None:
            for _ in range(CONCURRENCY):
                ours()
            records = [item._record() for item in tracing._pending]
            tracing._pending.clear()
            spans: list[ReadableSpan] = []
            builder.build(records, spans)
            otlp.export(spans)

        out["tracing: hot path + ReadableSpans + OTLP encoding in process (per request)"] = (
            best_of(encode, 50) / CONCURRENCY
        )
    tracing.shutdown()

    tracer, provider = make_sdk_tracer()
    sdk_batch_spans: list[Any] = []

    def sdk() -> None:
        t = now()
        span = sdk_spans(tracer, t, t + 10)
        span.end()
        sdk_batch_spans.append(span)
        if len(sdk_batch_spans) == CONCURRENCY:
            sdk_batch(tracer, sdk_batch_spans)
            sdk_batch_spans.clear()

    out["SDK Tracer: same spans, BatchSpanProcessor, null exporter"] = best_of(sdk, 3200)
    provider.shutdown()

    from server.observability.metrics import Metrics
    from server.observability.stats import ModelStats

    metrics = Metrics()
    observer = metrics.for_model("churn", "1", ModelStats(), lambda: 0.0)
    waits = [0.0001] * CONCURRENCY
    count = [0]

    def observe() -> None:
        observer.request_done(0.0002, "OK")
        count[0] += 1
        if count[0] == CONCURRENCY:
            observer.batch_done(CONCURRENCY, waits, 0.0003, True)
            count[0] = 0

    out["metrics: request_done + 1/64 batch_done (metrics and statistics)"] = best_of(observe, 6400)
    stats_only = StatsOnlyObserver(registry_stats or ModelStats())

    def observe_stats() -> None:
        stats_only.request_done(0.0002, "OK")
        count[0] += 1
        if count[0] == CONCURRENCY:
            stats_only.batch_done(CONCURRENCY, waits, 0.0003, True)
            count[0] = 0

    out["statistics only: request_done + 1/64 batch_done"] = best_of(observe_stats, 6400)
    return {k: round(v, 3) for k, v in out.items()}


# ---- main ----------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.observability_cost")
    parser.add_argument("--registry", type=Path, default=Path("/tmp/obs-reg"))
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--ticks", type=int, default=150, help="ticks of 64 requests per round")
    parser.add_argument("--out", type=Path, default=RESULTS / "observability_cost.json")
    parser.add_argument(
        "--grpc-request-us",
        type=float,
        default=150.0,
        help="server CPU of one request over gRPC, for the shares of a served request",
    )
    args = parser.parse_args(argv)
    registry = ensure_registry(args.registry)

    def process_tracing(exporter: str) -> Callable[[], Tracing]:
        def make() -> Tracing:
            settings = TracingSettings(sampling_ratio=1.0, exporter="console")
            with stdout_to_devnull():
                sink = _ProcessSink(settings, exporter=exporter)
            return Tracing(sink, sampling_ratio=1.0)

        return make

    def thread_tracing(exporter: Any) -> Callable[[], Tracing]:
        return lambda: Tracing.from_settings(
            TracingSettings(sampling_ratio=1.0, exporter="console"), exporter=exporter
        )

    variants = [
        Variant("metrics on, tracing off"),
        Variant("stats only (no Prometheus)", observer="stats"),
        Variant("metrics off (null observer)", observer="null"),
        Variant(
            "tracing 100%, records discarded (request path only)",
            tracing=lambda: Tracing(DiscardSink(), sampling_ratio=1.0),
        ),
        Variant("tracing 100%, export process (null exporter)", tracing=process_tracing("null")),
        Variant(
            "tracing 100%, export process (console to /dev/null)",
            tracing=process_tracing("console"),
        ),
        Variant(
            "tracing 100%, in-process thread, null exporter", tracing=thread_tracing(NullExporter())
        ),
        Variant("tracing 100%, SDK Tracer (BatchSpanProcessor, null exporter)", sdk=True),
    ]
    otlp = otlp_encoding_exporter()
    if otlp is not None:
        variants.append(
            Variant("tracing 100%, in-process thread, OTLP encoding", tracing=thread_tracing(otlp))
        )
    try:
        import uvloop

        path = uvloop.run(request_path(registry, args.rounds, args.ticks, variants))
    except ImportError:
        path = asyncio.run(request_path(registry, args.rounds, args.ticks, variants))
    micro_results = micro(None)

    base = path["metrics on, tracing off"]["cpu_us_per_request_median"]
    off = path["metrics off (null observer)"]["cpu_us_per_request_median"]
    traced = path["tracing 100%, export process (null exporter)"]["cpu_us_per_request_median"]
    # The in-process path leaves out gRPC (HTTP/2, the wire, the servicer task): a request
    # over gRPC costs about --grpc-request-us of server CPU, so the same added microseconds
    # are a smaller share of a served request.
    full = args.grpc_request_us
    summary = {
        "metrics_cpu_us_per_request": round(base - off, 2),
        "tracing_cpu_us_per_request": round(traced - base, 2),
        "in_process_path": {
            "metrics_share": round((base - off) / base, 3),
            "tracing_req_per_s_loss": round(1 - base / traced, 3),
        },
        f"grpc_request_of_{full:g}us": {
            "metrics_share": round((base - off) / full, 3),
            "tracing_req_per_s_loss": round((traced - base) / (full + traced - base), 3),
        },
        "targets": {"tracing_max_loss": 0.10, "metrics_max_share": 0.05},
    }
    result = {
        "machine": {
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "load_average": os.getloadavg(),
            "processor": platform.processor() or platform.machine(),
        },
        "concurrency": CONCURRENCY,
        "rounds": args.rounds,
        "requests_per_round": args.ticks * CONCURRENCY,
        "request_path": path,
        "micro_us": micro_results,
        "summary": summary,
        "otlp_exporter_installed": otlp is not None,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")

    print(f"request path, c={CONCURRENCY}, median of {args.rounds} interleaved rounds")
    print(
        f"{'variant':60s} {'CPU µs/req':>10s} {'wall µs/req':>11s} {'req/s vs base':>13s} "
        f"{'export proc CPU µs/req':>22s}"
    )
    for name, row in path.items():
        export = row["export_process_cpu_us_per_request"]
        print(
            f"{name:60s} {row['cpu_us_per_request_median']:10.2f} "
            f"{row['wall_us_per_request_median']:11.2f} {row['req_per_s_vs_baseline']:13.3f} "
            f"{'' if export is None else f'{export:22.2f}'}"
        )
    print("\nmicro-benchmarks (best of 7, µs per request)")
    for name, us in micro_results.items():
        print(f"{name:80s} {us:8.2f}")
    inproc = summary["in_process_path"]
    served = summary[f"grpc_request_of_{full:g}us"]
    print(
        f"\nmetrics: +{summary['metrics_cpu_us_per_request']:.2f} µs/request = "
        f"{inproc['metrics_share']:.1%} of the in-process path, {served['metrics_share']:.1%} of a "
        f"{full:g} µs gRPC request (target ≤ 5%)\n"
        f"tracing at 100% (export process): +{summary['tracing_cpu_us_per_request']:.2f} "
        f"µs/request = {inproc['tracing_req_per_s_loss']:.1%} of in-process req/s, "
        f"{served['tracing_req_per_s_loss']:.1%} of gRPC req/s (target ≤ 10%)"
    )
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
