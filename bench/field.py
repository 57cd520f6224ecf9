"""`make bench`, first part: batchline measured like the field, from outside, against real peers.

Every server is driven by Triton's C++ load generator, perf_analyzer (installed by
scripts/install_perf_analyzer.sh), on the same ONNX files (the demo registry's churn = GBM,
churn_mlp = 3x1024 MLP), 1 row per request:

- echo       bench/echo_server.py: grpc.aio V2, a fixed reply (the RPC ceiling of grpc.aio)
- echo-native   the same servicer on batchline's native transport (server/api/h2): the
             ceiling of batchline's own stack, which the echo targets compare against
- naive      bench/peers/naive_server.py: grpc.aio V2, one session.run per request
- batchline  `batchline serve` with its defaults (native gRPC transport, dynamic batching on)
- batchline-grpcio    `batchline serve --grpc-transport grpcio` (grpc.aio with the acceptor)
- batchline-nobatch   `batchline serve --no-batching`
- triton     tritonserver 2.51 (nvidia-pytriton 0.7.0): C++ front and dynamic batcher, its
             python backend running ONNX Runtime on each batch (bench/peers/triton_model.py)
- mlserver   MLServer 1.7.1, adaptive batching 32 / 5 ms, parallel_workers 0, a small ONNX
             Runtime MLModel (bench/peers/mlserver_runtime.py; 1.7.1 ships no ONNX runtime)

batchline and Triton are also measured over their V2 REST endpoints (calls `http`: Triton's
binary tensor data extension both ways, perf_analyzer's default; `http-json`: JSON tensors both
ways), on churn, by perf_analyzer -i http in its sync mode (its --async HTTP mode fails against
HTTP/1.1 servers here): one connection and one thread per concurrent request.

Each server is started alone, warmed, measured (perf_analyzer --async, and --streaming for
ModelStreamInfer, fixed windows with the stability check relaxed so a noisy machine finishes),
and stopped. Server CPU comes from /proc/PID/stat of the server's process tree and client CPU
from perf_analyzer's, both over the measured part of the run; per request = cores / req/s.
By default the server is pinned to one CPU and perf_analyzer to another (taskset), so req/s is
what one core of each server does, and a client that used ~its whole core is flagged
"client saturated" (the row then measures the client, not the server).

Writes bench/results/field.json and the README block between the field-table markers.

    python -m bench.field                      # everything, 4 s windows
    python -m bench.field --window-ms 500 --servers echo,batchline --no-readme   # a smoke run
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
PERF_ANALYZER = ROOT / ".tools" / "perf_analyzer" / "run"
SERVERS = (
    "echo", "echo-native", "naive", "batchline", "batchline-grpcio", "batchline-nobatch",
    "triton", "mlserver",
)  # fmt: skip
MODELS = ("churn", "churn_mlp")
ECHOES = ("echo", "echo-native")  # fixed replies: one row per call, any model name, no batching
SATURATED_CORES = 0.85  # a process that used this much of a core had no idle time left
# Servers whose ModelStreamInfer perf_analyzer cannot drive, and why.
NO_STREAM = {
    "mlserver": "not measured: MLServer's ModelStreamInfer answers ModelInferResponse, not "
    "Triton's ModelStreamInferResponse, so perf_analyzer misreads every reply",
    "echo-native": "not measured: a fixed reply at 50k+ req/s over one stream saturates "
    "perf_analyzer's --streaming mode, which then took 100 s for two 1 s windows",
}
# Servers whose V2 REST endpoint is measured, and on which models (the issue's HTTP targets
# are on churn; the heavy model adds little to a comparison of fronts).
HTTP_SERVERS = ("batchline", "triton")
HTTP_MODELS = ("churn",)
CALLS = ("unary", "stream", "http", "http-json")
README_MARKERS = ("<!-- field-table -->", "<!-- /field-table -->")


# ---- pure parts (unit-tested) ----------------------------------------------------------------


@dataclass(frozen=True)
class PerfRow:
    """One concurrency level of perf_analyzer's -f CSV (latencies there are in microseconds)."""

    concurrency: int
    throughput: float  # inferences/s; requests/s at batch 1
    p50_us: float
    p90_us: float
    p95_us: float
    p99_us: float


def parse_perf_csv(text: str) -> list[PerfRow]:
    """perf_analyzer's -f report. Its columns depend on the server (the server-side ones only
    when it reports statistics), so they are read by name."""
    rows = []
    for record in csv.DictReader(io.StringIO(text)):
        try:
            rows.append(
                PerfRow(
                    int(record["Concurrency"]),
                    float(record["Inferences/Second"]),
                    float(record["p50 latency"]),
                    float(record["p90 latency"]),
                    float(record["p95 latency"]),
                    float(record["p99 latency"]),
                )
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"perf_analyzer CSV: unexpected row {record!r} ({exc})") from exc
    if not rows:
        raise ValueError("perf_analyzer CSV: no rows")
    return rows


def cores_used(
    samples: list[tuple[float, float, float]], lead_s: float, tail_s: float
) -> tuple[float, float, float] | None:
    """(server cores, client cores, seconds) over the steady part of a run.

    `samples` are (monotonic time, server CPU s, client CPU s), taken while the client ran; the
    first `lead_s` (connect, metadata, ramp-up) and the last `tail_s` (drain, exit) are left
    out. None when fewer than two samples remain."""
    if len(samples) < 2:
        return None
    start, end = samples[0][0] + lead_s, samples[-1][0] - tail_s
    kept = [s for s in samples if start <= s[0] <= end]
    if len(kept) < 2 or kept[-1][0] <= kept[0][0]:
        kept = [samples[0], samples[-1]]
    (t0, s0, c0), (t1, s1, c1) = kept[0], kept[-1]
    span = t1 - t0
    if span <= 0:
        return None
    return (s1 - s0) / span, (c1 - c0) / span, span


@dataclass
class Point:
    server: str
    model: str  # "-" for the echo server's fixed reply
    call: str  # unary | stream (gRPC) | http (binary tensor data) | http-json
    concurrency: int
    rps: float | None = None
    p50_ms: float | None = None
    p90_ms: float | None = None
    p99_ms: float | None = None
    mean_batch: float | None = None
    server_cores: float | None = None
    server_us_per_request: float | None = None
    client_cores: float | None = None
    client_us_per_request: float | None = None
    client_saturated: bool | None = None
    error: str | None = None
    window_ms: int | None = None  # set where shorter than the run's (see window_for)


# perf_analyzer's own work per window grows faster than the requests in it: three 4 s windows
# against echo-native at ~34k req/s took it 48 s (and six never ended within the point's
# timeout), three 2 s windows 11 s. A point whose warm-up rate would put more than this in one
# window gets shorter windows.
MAX_WINDOW_REQUESTS = 80_000
MIN_WINDOW_MS = 1000


def window_for(rate: float | None, window_ms: int) -> int:
    """The window for a server that did `rate` req/s in its warm-up: `window_ms`, or less so
    one window holds at most MAX_WINDOW_REQUESTS (in whole 100 ms, never under MIN_WINDOW_MS)."""
    if not rate or rate * window_ms / 1000 <= MAX_WINDOW_REQUESTS:
        return window_ms
    return max(MIN_WINDOW_MS, int(MAX_WINDOW_REQUESTS / rate * 10) * 100)


def find(points: Iterable[Point], **kw: Any) -> Point | None:
    for p in points:
        if p.error is None and all(getattr(p, k) == v for k, v in kw.items()):
            return p
    return None


# name, (numerator selector, attribute), (denominator selector, attribute), op, goal
TARGETS: tuple[tuple[str, dict[str, Any], dict[str, Any], str, str, float], ...] = (
    # As filed: against grpc.aio's echo (the stack batchline ran on then).
    ("churn c=64 unary req/s: batchline / echo",
     {"server": "batchline", "model": "churn", "call": "unary", "concurrency": 64},
     {"server": "echo", "call": "unary", "concurrency": 64}, "rps", ">=", 0.9),
    ("churn c=64 unary server CPU per request: batchline / echo",
     {"server": "batchline", "model": "churn", "call": "unary", "concurrency": 64},
     {"server": "echo", "call": "unary", "concurrency": 64}, "server_us_per_request", "<=", 1.15),
    # Stricter: against the echo of batchline's own transport (native: server/api/h2).
    ("churn c=64 unary req/s: batchline / echo-native",
     {"server": "batchline", "model": "churn", "call": "unary", "concurrency": 64},
     {"server": "echo-native", "call": "unary", "concurrency": 64}, "rps", ">=", 0.9),
    ("churn c=64 unary req/s: batchline / naive",
     {"server": "batchline", "model": "churn", "call": "unary", "concurrency": 64},
     {"server": "naive", "model": "churn", "call": "unary", "concurrency": 64}, "rps", ">=", 1.05),
    ("churn c=1 unary p50: batchline / naive",
     {"server": "batchline", "model": "churn", "call": "unary", "concurrency": 1},
     {"server": "naive", "model": "churn", "call": "unary", "concurrency": 1}, "p50_ms", "<=", 1.1),
    ("churn c=64 req/s: batchline ModelStreamInfer / Triton unary",
     {"server": "batchline", "model": "churn", "call": "stream", "concurrency": 64},
     {"server": "triton", "model": "churn", "call": "unary", "concurrency": 64}, "rps", ">=", 1.0),
    ("churn_mlp c=64 unary req/s: batchline / Triton",
     {"server": "batchline", "model": "churn_mlp", "call": "unary", "concurrency": 64},
     {"server": "triton", "model": "churn_mlp", "call": "unary", "concurrency": 64}, "rps", ">=", 1.0),
    # Batching that pays: on a cheap model, the batcher beats running each request alone.
    ("churn c=64 unary req/s: batchline / batchline-nobatch",
     {"server": "batchline", "model": "churn", "call": "unary", "concurrency": 64},
     {"server": "batchline-nobatch", "model": "churn", "call": "unary", "concurrency": 64}, "rps", ">=", 1.05),
    ("churn c=64 unary server CPU per request: batchline / batchline-nobatch",
     {"server": "batchline", "model": "churn", "call": "unary", "concurrency": 64},
     {"server": "batchline-nobatch", "model": "churn", "call": "unary", "concurrency": 64}, "server_us_per_request", "<=", 0.95),
    ("churn c=64 unary server CPU per request: batchline / echo-native",
     {"server": "batchline", "model": "churn", "call": "unary", "concurrency": 64},
     {"server": "echo-native", "call": "unary", "concurrency": 64}, "server_us_per_request", "<=", 1.15),
    ("churn c=64 req/s: batchline HTTP (binary) / Triton HTTP",
     {"server": "batchline", "model": "churn", "call": "http", "concurrency": 64},
     {"server": "triton", "model": "churn", "call": "http", "concurrency": 64}, "rps", ">=", 1.0),
    ("churn c=64 req/s: batchline HTTP (binary) / batchline gRPC unary",
     {"server": "batchline", "model": "churn", "call": "http", "concurrency": 64},
     {"server": "batchline", "model": "churn", "call": "unary", "concurrency": 64}, "rps", ">=", 1.5),
    ("churn c=64 req/s: batchline HTTP JSON / HTTP binary",
     {"server": "batchline", "model": "churn", "call": "http-json", "concurrency": 64},
     {"server": "batchline", "model": "churn", "call": "http", "concurrency": 64}, "rps", ">=", 0.6),
    ("churn c=1 p50: batchline HTTP (binary) / batchline gRPC unary",
     {"server": "batchline", "model": "churn", "call": "http", "concurrency": 1},
     {"server": "batchline", "model": "churn", "call": "unary", "concurrency": 1}, "p50_ms", "<=", 1.1),
)  # fmt: skip


def targets(points: list[Point]) -> list[dict[str, Any]]:
    """The lead's goals as ratios of two measured points, each met / missed / n/a.

    Throughput targets also get `per_core`: the same ratio per core the server used (the
    inverse ratio of server CPU per request), which a busy machine disturbs far less than req/s.
    The note names rows whose client saturated (the ratio then bounds the client) and, for
    c=64 throughput, servers that got under SATURATED_CORES of their core (not CPU-bound:
    starved by other load, so their req/s understates them)."""
    out = []
    for name, num_sel, den_sel, attr, op, goal in TARGETS:
        num, den = find(points, **num_sel), find(points, **den_sel)
        a = None if num is None else getattr(num, attr)
        b = None if den is None else getattr(den, attr)
        value = None if a is None or not b else float(a) / float(b)
        met = None if value is None else (value >= goal if op == ">=" else value <= goal)
        per_core = None
        notes = []
        pair = [p for p in (num, den) if p is not None]
        # dict.fromkeys: a server named once when both rows are its own (HTTP / gRPC)
        saturated = list(dict.fromkeys(p.server for p in pair if p.client_saturated))
        if saturated:
            notes.append(f"client saturated ({', '.join(saturated)})")
        if attr == "rps":
            if num is not None and den is not None and num.server_us_per_request and den.server_us_per_request:  # fmt: skip
                per_core = den.server_us_per_request / num.server_us_per_request
            starved = [
                p.server
                for p in pair
                if p.concurrency > 1 and p.server_cores is not None and p.server_cores < SATURATED_CORES
            ]  # fmt: skip
            if starved:
                notes.append(
                    f"server under {SATURATED_CORES} cores ({', '.join(dict.fromkeys(starved))})"
                )
        out.append(
            {
                "target": name,
                "measured": value,
                "per_core": per_core,
                "goal": f"{op} {goal}",
                "met": met,
                "note": "; ".join(notes),
            }
        )
    return out


def _fmt(value: float | None, spec: str) -> str:
    return "" if value is None else format(value, spec)


def markdown(result: dict[str, Any]) -> str:
    """The README block: method, targets, and every row side by side."""
    m = result["machine"]
    method = result["method"]
    points = [Point(**p) for p in result["points"]]
    goal_rows = [
        "| target | measured | per server core | goal | met | note |",
        "|---|---:|---:|---|---|---|",
    ]
    for g in result["targets"]:
        verdict = "n/a" if g["met"] is None else ("met" if g["met"] else "missed")
        if g["met"] is not None and g["note"]:
            verdict += " (unsure: see note)"
        goal_rows.append(
            f"| {g['target']} | {_fmt(g['measured'], '.2f') or 'n/a'} | "
            f"{_fmt(g.get('per_core'), '.2f')} | {g['goal']} | {verdict} | {g['note']} |"
        )
    rows = [
        "| server | model | call | c | req/s | p50 ms | p99 ms | mean batch | server CPU us/req | server cores | client cores | note |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for p in points:
        notes = [p.error or ("client saturated" if p.client_saturated else "")]
        if p.window_ms:
            notes.append(f"{p.window_ms} ms windows")
        note = "; ".join(n for n in notes if n)
        rows.append(
            f"| {p.server} | {p.model} | {p.call} | {p.concurrency} | {_fmt(p.rps, ',.0f')} | "
            f"{_fmt(p.p50_ms, '.2f')} | {_fmt(p.p99_ms, '.2f')} | {_fmt(p.mean_batch, '.1f')} | "
            f"{_fmt(p.server_us_per_request, ',.0f')} | {_fmt(p.server_cores, '.2f')} | "
            f"{_fmt(p.client_cores, '.2f')} | {note} |"
        )
    pin = (
        f"server pinned to CPU {method['server_cpus']}, perf_analyzer to CPU {method['client_cpus']} (taskset)"
        if method["server_cpus"]
        else "server and perf_analyzer unpinned, sharing the cores"
    )
    head = (
        f"Measured {result['date']} on {m['cpus']} cores ({m['cpu_model']}; load average "
        f"{m['loadavg_before']} before the run, {m.get('loadavg_after', '?')} after), Python {m['python']}, onnxruntime "
        f"{m['onnxruntime']}. Client: perf_analyzer (tritonclient 2.41) `--async` "
        f"(`--streaming` for the stream rows; `-i http` in sync mode for the http rows, binary "
        f"tensor data or JSON both ways), 1 row per request, the mean of 3 windows of "
        f"{method['window_ms']} ms per point (at most {method['max_trials']} windows; stability "
        f"check relaxed; shorter, noted in the row, where one would hold over "
        f"{MAX_WINDOW_REQUESTS:,} requests, which slows perf_analyzer itself), after a "
        f"{method['warmup_ms']} ms x 3 warm-up per model; {pin}. Each server started alone, on "
        "the same model.onnx files, then stopped. Server CPU: /proc/PID/stat of the server's "
        "process tree (Triton's stubs included) over the measured part of the run, divided by "
        f"requests; a client above {SATURATED_CORES} cores is flagged saturated. "
        "`python -m bench.field` (the first step of `make bench`) reproduces it."
    )
    return "\n\n".join([head, "\n".join(goal_rows), "\n".join(rows)])


def replace_block(text: str, block: str) -> str:
    begin, end = README_MARKERS
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    if not pattern.search(text):
        raise ValueError(f"README.md has no {begin} ... {end} block")
    return pattern.sub(lambda _m: f"{begin}\n{block}\n{end}", text, count=1)


# ---- measuring -------------------------------------------------------------------------------


class Sampler:
    """CPU seconds of the server tree and of the client, every `period_s`, while the client runs."""

    def __init__(self, server_cpu: Callable[[], float], client_pid: int, period_s: float = 0.25):
        from bench.processes import tree_cpu_seconds

        self._server_cpu = server_cpu
        self._client = lambda: tree_cpu_seconds(client_pid)
        self._period = period_s
        self._stop = threading.Event()
        self.samples: list[tuple[float, float, float]] = []
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _take(self) -> None:
        self.samples.append((time.monotonic(), self._server_cpu(), self._client()))

    def _run(self) -> None:
        self._take()
        while not self._stop.wait(self._period):
            self._take()

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def perf_analyzer_cmd(
    port: int, model: str, concurrency: int, call: str, window_ms: int, trials: int,
    report: Path, shape: str | None, cpus: str | None,
) -> list[str]:  # fmt: skip
    """perf_analyzer for one point; `port` is the gRPC port, or the HTTP one for http calls."""
    http = call in ("http", "http-json")
    cmd = [
        str(PERF_ANALYZER), "-i", "http" if http else "grpc", "-u", f"127.0.0.1:{port}",
        "-m", model, "--concurrency-range", str(concurrency),
        "--measurement-interval", str(window_ms), "--stability-percentage", "1000",
        "--max-trials", str(trials), "-f", str(report),
    ]  # fmt: skip
    if call == "stream":
        cmd.append("--streaming")
    elif call == "http-json":
        cmd += ["--input-tensor-format", "json", "--output-tensor-format", "json"]
    elif not http:
        cmd.append("--async")  # HTTP stays in sync mode: its --async fails on HTTP/1.1 servers
    if shape:
        cmd += ["--shape", shape]
    return ["taskset", "-c", cpus, *cmd] if cpus else cmd


def settled_counts(counts: Callable[[], tuple[int, int] | None]) -> tuple[int, int] | None:
    """The counters once two reads 250 ms apart agree (MLServer's file is rewritten every
    200 ms; requests in flight when the client exits still land)."""
    deadline = time.monotonic() + 5.0
    last = counts()
    while time.monotonic() < deadline:
        time.sleep(0.25)
        now = counts()
        if now == last:
            return now
        last = now
    return last


def measure(
    server: Any, label: str, model: str, call: str, concurrency: int, args: argparse.Namespace,
    work: Path, window_ms: int | None = None, trials: int | None = None,
) -> Point:  # fmt: skip
    window_ms = window_ms or args.window_ms
    trials = trials or args.trials
    point = Point(label, "-" if label in ECHOES else model, call, concurrency)
    if window_ms != args.window_ms:
        point.window_ms = window_ms
    report = work / f"{label}-{model}-{call}-c{concurrency}.csv"
    # the echo servers' config has no batch dimension
    shape = "input:1,15" if label in ECHOES else None
    port = server.http_port if call in ("http", "http-json") else server.port
    cmd = perf_analyzer_cmd(
        port, model, concurrency, call, window_ms, trials, report, shape, args.client_cpus
    )
    report.unlink(missing_ok=True)  # the warm-up wrote one under the same name
    before = server.counts(model)
    log = report.with_suffix(".log")
    expected_s = 3 * window_ms / 1000  # perf_analyzer reports once 3 windows agree
    with open(log, "wb") as out:
        popen = subprocess.Popen(cmd, cwd=work, stdout=out, stderr=subprocess.STDOUT)
        with Sampler(server.cpu_seconds, popen.pid) as sampler:
            try:
                code = popen.wait(timeout=trials * window_ms / 1000 * 4 + 120)
            except subprocess.TimeoutExpired:
                popen.kill()
                code = popen.wait()
    output = log.read_text(errors="replace")
    if code != 0 or not report.exists():
        lines = [ln for ln in output.splitlines() if ln.strip()]
        point.error = f"perf_analyzer exit {code}: {lines[-1] if lines else 'no output'}"[:200]
        return point
    (row,) = parse_perf_csv(report.read_text())
    point.rps = row.throughput
    point.p50_ms, point.p90_ms, point.p99_ms = row.p50_us / 1e3, row.p90_us / 1e3, row.p99_us / 1e3
    lead = min(1.0, 0.15 * expected_s)
    used = cores_used(sampler.samples, lead_s=lead, tail_s=min(0.3, 0.1 * expected_s))
    if used is not None and point.rps:
        point.server_cores, point.client_cores = used[0], used[1]
        point.server_us_per_request = used[0] / point.rps * 1e6
        point.client_us_per_request = used[1] / point.rps * 1e6
        point.client_saturated = used[1] >= SATURATED_CORES
    if label == "naive":
        point.mean_batch = 1.0  # one session.run per request by construction
    elif before is not None:
        after = settled_counts(lambda: server.counts(model))
        if after is not None and after[1] > before[1]:
            point.mean_batch = (after[0] - before[0]) / (after[1] - before[1])
    return point


def start_server(label: str, work: Path, registry: Path, onnx: dict[str, Path], cpus: str | None) -> Any:  # fmt: skip
    from bench.peers import launch

    if label in ECHOES:
        return launch.start_echo(work, cpus, "native" if label == "echo-native" else "grpcio")
    if label == "naive":
        return launch.start_naive(work, onnx, cpus)
    if label in ("batchline", "batchline-nobatch"):
        return launch.start_batchline(work, registry, list(onnx), label == "batchline", cpus)
    if label == "batchline-grpcio":
        return launch.start_batchline(work, registry, list(onnx), True, cpus, transport="grpcio")
    if label == "triton":
        return launch.start_triton(work, onnx, cpus)
    if label == "mlserver":
        return launch.start_mlserver(work, onnx, cpus)
    raise ValueError(f"unknown server {label!r}")


def measurement_plan(
    label: str, models: list[str], args: argparse.Namespace
) -> tuple[list[tuple[str, str, int]], list[Point]]:
    """(model, call, concurrency) to measure on `label`, in order, and the points left out
    with the reason."""
    plan = [(m, "unary", c) for m in models for c in args.levels]
    skipped: list[Point] = []
    if label in NO_STREAM:
        skipped = [Point(label, m, "stream", c, error=NO_STREAM[label]) for m in models for c in args.stream_levels]  # fmt: skip
    else:
        plan += [(m, "stream", c) for m in models for c in args.stream_levels]
    if label in HTTP_SERVERS:
        for m in (m for m in models if m in HTTP_MODELS):
            plan += [(m, "http", c) for c in args.http_levels]
            plan += [(m, "http-json", c) for c in args.http_json_levels]
    return plan, skipped


def run_server(
    label: str, args: argparse.Namespace, work: Path, registry: Path, onnx: dict[str, Path]
) -> list[Point]:
    from bench.processes import LaunchError

    models = ["churn"] if label in ECHOES else [m for m in args.models if m in onnx]
    plan, skipped = measurement_plan(label, models, args)
    try:
        server = start_server(label, work, registry, onnx, args.server_cpus)
    except (LaunchError, OSError, subprocess.CalledProcessError) as exc:
        print(f"{label}: did not start: {exc}", file=sys.stderr, flush=True)
        reason = str(exc).splitlines()[0][:200]
        return [Point(label, "-" if label in ECHOES else m, call, c, error=reason) for m, call, c in plan]  # fmt: skip
    points = []
    try:
        for model in models:
            warm = measure(server, label, model, "unary", 64, args, work, args.warmup_ms, 3)
            window = window_for(warm.rps, args.window_ms)
            for m, call, c in plan:
                if m != model:
                    continue
                p = measure(server, label, model, call, c, args, work, window)
                points.append(p)
                if p.error:
                    print(f"{label} {p.model} {call} c={c}: {p.error}", flush=True)
                else:
                    print(
                        f"{label} {p.model} {call} c={c}: {p.rps:,.0f} req/s p50 {p.p50_ms:.2f} "
                        f"p99 {p.p99_ms:.2f} ms batch {_fmt(p.mean_batch, '.1f') or '-'} "
                        f"server {_fmt(p.server_us_per_request, ',.0f')} us/req "
                        f"({_fmt(p.server_cores, '.2f')} cores) client "
                        f"{_fmt(p.client_cores, '.2f')} cores"
                        + (" SATURATED" if p.client_saturated else ""),
                        flush=True,
                    )
    finally:
        code = server.stop()
        if code not in (0, -15):
            print(f"{label} exited with {code}; log {server.log}", file=sys.stderr)
    return points + skipped


def export_models(registry: Path, work: Path, models: Iterable[str]) -> dict[str, Path]:
    """Each model's production model.onnx, the one file every server loads."""
    from registry_client import FileRegistry

    reg = FileRegistry(registry)
    out = {}
    for name in models:
        mv = reg.resolve(f"{name}@production")
        target = work / "models" / name / "model.onnx"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(reg.fetch(mv), target)
        out[name] = target
    return out


def machine_info() -> dict[str, Any]:
    import importlib.metadata

    cpu_model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpus": os.cpu_count(),
        "cpu_model": cpu_model,
        "loadavg_before": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "onnxruntime": importlib.metadata.version("onnxruntime"),
    }


def csv_list(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in csv_list(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers separated by commas, got {text!r}") from None  # fmt: skip


def default_cpus() -> tuple[str | None, str | None]:
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2 or shutil.which("taskset") is None:
        return None, None
    return str(cpus[0]), str(cpus[1])


def write_report(result: dict[str, Any], out: Path, readme: bool) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    block = markdown(result)
    print("\n" + block)
    if readme:
        path = ROOT / "README.md"
        path.write_text(replace_block(path.read_text(), block))


def rerender(out: Path, readme: bool) -> int:
    try:
        result = json.loads(out.read_text())
        points = [Point(**p) for p in result["points"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        print(f"bench.field --rerender: cannot read {out}: {exc}", file=sys.stderr)
        return 2
    result["targets"] = targets(points)
    write_report(result, out, readme)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.field", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--registry", type=Path, default=ROOT / "demo-registry")
    parser.add_argument("--servers", type=csv_list, default=list(SERVERS), help=",".join(SERVERS))
    parser.add_argument("--models", type=csv_list, default=list(MODELS))
    parser.add_argument("--levels", type=int_list, default=[1, 64], help="unary concurrencies")
    parser.add_argument("--stream-levels", type=int_list, default=[64], help="ModelStreamInfer")
    parser.add_argument(
        "--http-levels", type=int_list, default=[1, 64],
        help="REST concurrencies, binary tensor data (batchline, triton; churn)",
    )  # fmt: skip
    parser.add_argument(
        "--http-json-levels", type=int_list, default=[64], help="REST concurrencies, JSON tensors"
    )
    parser.add_argument("--window-ms", type=int, default=4000, help="one measurement window")
    parser.add_argument(
        "--max-trials",
        dest="trials",
        type=int,
        default=6,
        help="most windows per point; perf_analyzer reports the first 3 that agree (>= 3)",
    )
    parser.add_argument("--warmup-ms", type=int, default=700, help="warm-up window (x 3)")
    parser.add_argument("--server-cpus", help="taskset list for the server (default: 1st CPU)")
    parser.add_argument("--client-cpus", help="taskset list for perf_analyzer (default: 2nd CPU)")
    parser.add_argument("--no-pin", action="store_true", help="no taskset: all share all cores")
    parser.add_argument("--out", type=Path, default=RESULTS / "field.json")
    parser.add_argument("--no-readme", action="store_true")
    parser.add_argument(
        "--rerender",
        action="store_true",
        help="measure nothing: recompute the targets of --out's points, rewrite it and README",
    )
    args = parser.parse_args(argv)
    if args.rerender:
        return rerender(args.out, readme=not args.no_readme)

    unknown = sorted(set(args.servers) - set(SERVERS))
    if unknown:
        parser.error(f"--servers: unknown {', '.join(unknown)} (choose from {', '.join(SERVERS)})")
    bad_models = sorted(set(args.models) - set(MODELS))
    if bad_models:
        parser.error(f"--models: unknown {', '.join(bad_models)} (choose from {', '.join(MODELS)})")
    if args.trials < 3:
        parser.error("--max-trials: perf_analyzer needs at least 3 windows to report")
    if args.window_ms < 100 or args.warmup_ms < 100:
        parser.error("--window-ms and --warmup-ms: at least 100")
    if not PERF_ANALYZER.exists():
        print(
            f"bench.field: {PERF_ANALYZER.relative_to(ROOT)} is missing; run "
            "scripts/install_perf_analyzer.sh (make bench does)",
            file=sys.stderr,
        )
        return 2
    if args.no_pin:
        args.server_cpus = args.client_cpus = None
    elif args.server_cpus is None and args.client_cpus is None:
        args.server_cpus, args.client_cpus = default_cpus()

    registry: Path = args.registry
    from registry_client import FileRegistry

    if not registry.exists() or not set(MODELS) <= set(FileRegistry(registry).list_models()):
        from registry_client.demo import build_demo

        print(f"building demo models into {registry} ...", flush=True)
        build_demo(registry)

    RESULTS.mkdir(parents=True, exist_ok=True)
    machine = machine_info()
    work = Path(tempfile.mkdtemp(prefix="bench-field-"))
    points: list[Point] = []
    try:
        onnx = export_models(registry, work, MODELS)
        for label in args.servers:
            print(f"--- {label}", flush=True)
            points += run_server(label, args, work, registry, onnx)
    finally:
        failed = any(p.error and not p.error.startswith("not measured") for p in points)
        if failed:
            print(f"logs kept in {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)

    machine["loadavg_after"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine,
        "method": {
            "client": "perf_analyzer (tritonclient 2.41.0 wheel), --async / --streaming; "
            "-i http in sync mode for the http rows",
            "rows_per_request": 1,
            "window_ms": args.window_ms,
            "max_trials": args.trials,
            "warmup_ms": args.warmup_ms,
            "server_cpus": args.server_cpus,
            "client_cpus": args.client_cpus,
            "saturated_cores": SATURATED_CORES,
            "peers": {
                "triton": "tritonserver 2.51 (nvidia-pytriton 0.7.0), python backend + ORT, "
                "max_batch_size 64, max_queue_delay 500 us, 1 CPU instance, "
                "--grpc-infer-allocation-pool-size 256 (2.51 crashes on streams at c>=32 without)",
                "mlserver": "MLServer 1.7.1, adaptive batching 32 / 5 ms, parallel_workers 0",
                "naive": "grpc.aio + uvloop, one session.run per request on the loop",
                "echo": "grpc.aio + uvloop, fixed reply",
                "echo-native": "batchline's native HTTP/2 transport + uvloop, fixed reply",
            },
        },
        "points": [asdict(p) for p in points],
        "targets": targets(points),
    }
    write_report(result, args.out, readme=not args.no_readme)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
