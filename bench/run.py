"""`make bench`: batchline's benchmarks, in one run on one machine, as ratios.

1. raw onnxruntime in-process rows/s at batch 1..256 for each demo model (the physical limit);
2. an echo V2 server on the same gRPC stack (the RPC ceiling);
3. batchline with batching off and on, unary and streaming, at several concurrencies:
   req/s, rows/s, p50/p95/p99, mean batch size, server and client CPU.
The load comes from loadtest/ (one process per point unless --procs). Results go to
bench/results/latest.json (+ a timestamped copy) and bench/results/throughput_p99.png, and the
table in README.md between the bench-table markers is replaced.

The machine is small and noisy: each point is one window after a warm-up; run it twice and
compare ratios, not absolute numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bench.processes import Spawned, free_port, launch
from bench.scrape import scrape as scrape_samples
from bench.scrape import totals
from registry_client.demo import DEMO_MODELS

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
MODELS = DEMO_MODELS


# ---- processes -------------------------------------------------------------------------------


Proc = Spawned


def start(cmd: list[str], tag: str) -> Proc:
    return launch(tag, cmd, RESULTS)


def start_echo() -> Proc:
    return start([sys.executable, "-m", "bench.echo_server", "--port", "0"], "echo")


def start_batchline(
    registry: Path, batching: bool, *extra: str, models: tuple[str, ...] = MODELS, tag: str = ""
) -> Proc:
    cmd = [
        sys.executable, "-m", "server.cli", "serve", "--registry", str(registry),
        "--host", "127.0.0.1", "--grpc-port", "0", "--http-port", "0", "--metrics-port", "0",
        "--log-level", "warning",
        *(a for m in models for a in ("--model", f"{m}@production")), *extra,
    ]  # fmt: skip
    if not batching:
        cmd.append("--no-batching")
    return start(cmd, tag or f"batchline-{'on' if batching else 'off'}")


def scrape(port: int) -> dict[str, float]:
    """The server's metrics as {name: value summed over labels} (for round-trip ratios)."""
    return totals(scrape_samples(port))


def model_counts(port: int, model: str) -> tuple[int, int]:
    """(rows, batches) so far, from ModelStatistics."""
    import grpc

    from server._proto import inference_pb2 as pb
    from server._proto import inference_pb2_grpc as pb_grpc

    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stats = pb_grpc.GRPCInferenceServiceStub(channel).ModelStatistics(
            pb.ModelStatisticsRequest(name=model), timeout=10
        )
    s = stats.model_stats[0]
    return s.inference_count, s.execution_count


# ---- measurements ----------------------------------------------------------------------------


@dataclass
class Point:
    server: str  # echo | off | on
    model: str
    call: str  # unary | stream
    concurrency: int
    rows: int
    rps: float
    rows_per_s: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    ok: int
    errors: int
    mean_batch: float | None
    server_cpu_s: float
    client_cpu_s: float
    window_s: float
    statuses: dict[str, int] = field(default_factory=dict)


def load(
    proc: Proc,
    server: str,
    model: str,
    call: str,
    concurrency: int,
    seconds: float,
    procs: int,
    rows: int = 1,
    request: bytes | None = None,
) -> Point:
    from loadtest import Options, run

    method = "ModelStreamInfer" if call == "stream" else "ModelInfer"
    options = Options(
        f"127.0.0.1:{proc.port}",
        call=f"inference.GRPCInferenceService/{method}",
        model=None if request is not None else model,
        request=request,
        rows=rows,
        concurrency=concurrency,
        duration_s=seconds,
        procs=procs,
        skip_first=min(200, concurrency * 4),
        timeout_s=30.0,
    )
    counts = model_counts(proc.port, model) if server != "echo" else (0, 0)
    cpu0 = proc.cpu_seconds()
    start_t = time.perf_counter()
    report = run(options)
    window = time.perf_counter() - start_t
    cpu = proc.cpu_seconds() - cpu0
    mean_batch = None
    if server != "echo":
        after = model_counts(proc.port, model)
        mean_batch = (after[0] - counts[0]) / max(1, after[1] - counts[1])
    pct = {p.percentage: p.latency_ns / 1e6 for p in report.latency_distribution}
    ok = report.status_codes.get("OK", 0)
    return Point(
        server, model, call, concurrency, rows, report.rps, report.rps * rows,
        pct.get(50, float("nan")), pct.get(95, float("nan")), pct.get(99, float("nan")),
        ok, report.count - ok, mean_batch, cpu, report.client_cpu_seconds, window,
        dict(report.status_codes),
    )  # fmt: skip


def raw_onnxruntime(registry: Path) -> list[dict[str, Any]]:
    import onnxruntime as ort

    from registry_client import FileRegistry

    reg = FileRegistry(registry)
    out = []
    for model in MODELS:
        mv = reg.resolve(f"{model}@production")
        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        session = ort.InferenceSession(str(reg.fetch(mv)), so, providers=["CPUExecutionProvider"])
        for batch in (1, 2, 4, 8, 16, 32, 64, 128, 256):
            x = np.random.default_rng(0).random((batch, 15), dtype=np.float32)
            for _ in range(5):
                session.run(None, {"input": x})
            n = max(20, min(20000, int(20000 / batch)))
            samples = []
            for _ in range(5):
                t = time.perf_counter()
                for _ in range(n // 5):
                    session.run(None, {"input": x})
                samples.append((time.perf_counter() - t) / (n // 5))
            per_call = float(np.median(samples))
            out.append(
                {
                    "model": model,
                    "batch": batch,
                    "us_per_call": per_call * 1e6,
                    "rows_per_s": batch / per_call,
                }
            )
    return out


# ---- report ----------------------------------------------------------------------------------


def find(points: list[Point], **kw: Any) -> Point | None:
    for p in points:
        if all(getattr(p, k) == v for k, v in kw.items()):
            return p
    return None


def targets(points: list[Point]) -> list[dict[str, Any]]:
    def ratio(a: Point | None, b: Point | None, attr: str) -> float | None:
        if a is None or b is None or not getattr(b, attr):
            return None
        return float(getattr(a, attr) / getattr(b, attr))

    rows = [
        ("churn c=64 unary: batchline / echo req/s", ratio(find(points, server="on", model="churn", call="unary", concurrency=64), find(points, server="echo", call="unary", concurrency=64), "rps"), ">=", 0.85),
        ("churn_mlp c=64 unary: batching on / off req/s", ratio(find(points, server="on", model="churn_mlp", call="unary", concurrency=64), find(points, server="off", model="churn_mlp", call="unary", concurrency=64), "rps"), ">=", 3.0),
        ("churn c=1 unary: p50 on / off", ratio(find(points, server="on", model="churn", call="unary", concurrency=1), find(points, server="off", model="churn", call="unary", concurrency=1), "p50_ms"), "<=", 1.1),
        ("churn_mlp c=1 unary: p50 on / off", ratio(find(points, server="on", model="churn_mlp", call="unary", concurrency=1), find(points, server="off", model="churn_mlp", call="unary", concurrency=1), "p50_ms"), "<=", 1.1),
        ("churn c=64: streaming / unary req/s", ratio(find(points, server="on", model="churn", call="stream", concurrency=64), find(points, server="on", model="churn", call="unary", concurrency=64), "rps"), ">=", 1.3),
    ]  # fmt: skip
    out = []
    for name, value, op, goal in rows:
        met = None if value is None else (value >= goal if op == ">=" else value <= goal)
        out.append({"target": name, "measured": value, "goal": f"{op} {goal}", "met": met})
    return out


def table(points: list[Point]) -> str:
    lines = [
        "| server | model | call | c | req/s | rows/s | p50 ms | p95 ms | p99 ms | mean batch | server CPU s | client CPU s | errors |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for p in points:
        batch = "" if p.mean_batch is None else f"{p.mean_batch:.1f}"
        lines.append(
            f"| {p.server} | {p.model} | {p.call} | {p.concurrency} | {p.rps:,.0f} | {p.rows_per_s:,.0f} | "
            f"{p.p50_ms:.2f} | {p.p95_ms:.2f} | {p.p99_ms:.2f} | {batch} | {p.server_cpu_s:.1f} | {p.client_cpu_s:.1f} | {p.errors} |"
        )
    return "\n".join(lines)


def plot(points: list[Point], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, model in zip(axes, MODELS, strict=True):
        for server in ("off", "on"):
            for call, style in (("unary", "-o"), ("stream", "--s")):
                series = sorted(
                    (
                        p
                        for p in points
                        if p.server == server and p.model == model and p.call == call
                    ),
                    key=lambda p: p.concurrency,
                )
                if series:
                    ax.plot(
                        [p.rps for p in series],
                        [p.p99_ms for p in series],
                        style,
                        label=f"batching {server}, {call}",
                    )
        for p in points:
            if p.server == "echo":
                ax.axvline(p.rps, color="grey", linestyle=":", linewidth=1)
        ax.set_title(f"{model}: throughput vs p99 (c = 1..128; dotted: echo ceiling)")
        ax.set_xlabel("requests / s")
        ax.set_ylabel("p99 latency (ms)")
        ax.set_yscale("log")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def update_readme(markdown: str) -> None:
    readme = ROOT / "README.md"
    text = readme.read_text()
    new = re.sub(
        r"<!-- bench-table -->.*<!-- /bench-table -->",
        lambda _m: f"<!-- bench-table -->\n{markdown}\n<!-- /bench-table -->",
        text,
        flags=re.S,
    )
    readme.write_text(new)


def entity_scenario(
    registry: Path, seconds: float, procs: int, delays: tuple[str, ...] = ("default", "0")
) -> dict[str, Any]:
    """Entity-keyed requests (features from a redis-server the bench starts) vs inline features,
    churn at c=64 and c=4, with feature-store round trips per request from the server's metrics.
    `delays`: "default" (the server's coalescing defaults) and feature_max_delay_us values
    (0: coalesce within one loop tick only)."""
    import shutil
    import struct
    import tempfile

    from registry_client.demo import load_reference
    from server._proto import inference_pb2 as pb

    work = Path(tempfile.mkdtemp(prefix="bench-features-"))
    port = free_port()
    redis = subprocess.Popen(
        [
            "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ],
        stdout=subprocess.DEVNULL,
    )
    try:
        reg = work / "registry"
        shutil.copytree(registry, reg)
        from registry_client import FileRegistry
        from server.features.view import FeatureView

        # The view registered with the version (an edited feature_view.json would be refused
        # as tampering): its entity key and feature names make the table's columns.
        store = FileRegistry(reg)
        version = store.resolve("churn@production").version
        view = FeatureView.from_json(
            store.attachment("churn", version, "feature_view.json").read_text()
        )
        X, _ = load_reference(registry, "churn", version)
        table = work / "customers.csv"
        table.write_text(
            view.entity_key + "," + ",".join(view.feature_names) + "\n"
            + "".join(f"c{i}," + ",".join(repr(float(v)) for v in row) + "\n" for i, row in enumerate(X))
        )  # fmt: skip
        url = f"redis://127.0.0.1:{port}/0"
        subprocess.run(
            [sys.executable, "-m", "server.cli", "features", "materialize", "--registry", str(reg),
             "--model", "churn@production", "--input", str(table), "--store", url],
            cwd=ROOT, check=True, capture_output=True,
        )  # fmt: skip
        # Both requests as tritonclient sends them: tensors in raw_input_contents (BYTES
        # elements with their 4-byte length prefix).
        by_entity = pb.ModelInferRequest(model_name="churn", id="e")
        by_entity.inputs.add(name=view.entity_key, datatype="BYTES", shape=[1])
        by_entity.raw_input_contents.append(struct.pack("<I", 2) + b"c7")
        inline = pb.ModelInferRequest(model_name="churn", id="i")
        inline.inputs.add(name="input", datatype="FP32", shape=[1, 15])
        inline.raw_input_contents.append(np.ascontiguousarray(X[7:8]).tobytes())
        out: dict[str, Any] = {}
        # The coalescing window trades latency for round trips: the defaults vs a tick only.
        for delay in delays:
            config = work / f"delay-{delay}.toml"
            text = "" if delay == "default" else f"feature_max_delay_us = {int(delay)}\n"
            config.write_text(f"[server]\n{text}")
            server = start_batchline(
                reg, True, "--feature-store", url, "--config", str(config),
                models=("churn",), tag=f"features-{delay}",
            )  # fmt: skip
            label = "default" if delay == "default" else f"delay_{delay}us"
            try:
                for c in (64, 4):
                    base = load(server, "on", "churn", "unary", c, seconds, procs, request=inline.SerializeToString())  # fmt: skip
                    before = scrape(server.metrics_port)
                    ent = load(server, "on", "churn", "unary", c, seconds, procs, request=by_entity.SerializeToString())  # fmt: skip
                    after = scrape(server.metrics_port)
                    key = "batchline_feature_round_trips_total"
                    trips = after.get(key, 0) - before.get(key, 0)
                    answered = ent.ok + ent.errors
                    out[f"{label}_c{c}"] = {
                        "inline": asdict(base),
                        "entity": asdict(ent),
                        "entity_over_inline_rps": ent.rps / base.rps if base.rps else None,
                        "round_trips_per_request": trips / answered if answered else None,
                    }
            finally:
                server.stop()
        if "default_c64" in out:
            default = out["default_c64"]
            out["entity_over_inline_rps"] = default["entity_over_inline_rps"]
            out["round_trips_per_request"] = default["round_trips_per_request"]
        return out
    finally:
        redis.kill()
        shutil.rmtree(work, ignore_errors=True)


def shadow_scenario(registry: Path, seconds: float, procs: int) -> dict[str, Any]:
    """churn at c=64 with one shadow (churn version 2) mirrored vs none."""
    out: dict[str, Any] = {}
    for name, extra in (("off", ()), ("on", ("--shadow", "2"))):
        server = start_batchline(registry, True, *extra, models=("churn",), tag=f"shadow-{name}")
        try:
            out[name] = asdict(load(server, "on", "churn", "unary", 64, seconds, procs))
            if name == "on":
                metrics = scrape(server.metrics_port)
                out["mirrored"] = {
                    k.split("_total")[0]: v
                    for k, v in metrics.items()
                    if k.startswith("batchline_shadow_requests")
                }
        finally:
            server.stop()
    out["rps_on_over_off"] = out["on"]["rps"] / out["off"]["rps"] if out["off"]["rps"] else None
    out["p99_on_over_off"] = (
        out["on"]["p99_ms"] / out["off"]["p99_ms"] if out["off"]["p99_ms"] else None
    )
    return out


def drift_scenario(registry: Path, seconds: float, procs: int) -> dict[str, Any]:
    """churn at c=64 unary with every prediction streamed to a real drift sidecar vs not."""
    import tempfile

    work = Path(tempfile.mkdtemp(prefix="bench-drift-"))
    sidecar = start(
        [sys.executable, "-m", "server.drift.sidecar", "--registry", str(registry),
         "--host", "127.0.0.1", "--grpc-port", "0", "--http-port", "0"],
        "drift-sidecar",
    )  # fmt: skip
    out: dict[str, Any] = {}
    try:
        config = work / "drift.toml"
        config.write_text(f'[drift]\nenabled = true\ntarget = "127.0.0.1:{sidecar.port}"\n')
        for name, extra in (("off", ()), ("on", ("--config", str(config)))):
            server = start_batchline(registry, True, *extra, models=("churn",), tag=f"drift-{name}")
            try:
                out[name] = asdict(load(server, "on", "churn", "unary", 64, seconds, procs))
                if name == "on":
                    metrics = scrape(server.metrics_port)
                    out["producer"] = {
                        k: v for k, v in metrics.items() if k.startswith("batchline_drift_producer")
                    }
            finally:
                server.stop()
    finally:
        sidecar.stop()
    out["rps_on_over_off"] = out["on"]["rps"] / out["off"]["rps"] if out["off"]["rps"] else None
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--registry", default=str(ROOT / "demo-registry"))
    parser.add_argument("--seconds", type=float, default=4.0, help="measured window per point")
    parser.add_argument("--concurrency", default="1,8,32,64,128")
    parser.add_argument("--procs", type=int, default=1, help="load generator processes per point")
    parser.add_argument("--no-readme", action="store_true")
    parser.add_argument(
        "--only",
        choices=("drift", "features"),
        help="run one scenario, print it, touch nothing else",
    )
    parser.add_argument(
        "--feature-delays",
        default="default,0",
        help="'default' and/or feature_max_delay_us values for --only features",
    )
    args = parser.parse_args()
    registry = Path(args.registry)
    RESULTS.mkdir(parents=True, exist_ok=True)
    from registry_client import FileRegistry

    if not registry.exists() or not set(MODELS) <= set(FileRegistry(registry).list_models()):
        from registry_client.demo import build_demo

        print(f"building demo models into {registry} ...", flush=True)
        build_demo(registry)
    if args.only == "features":
        delays = tuple(args.feature_delays.split(","))
        result = entity_scenario(registry, args.seconds, args.procs, delays)
        (RESULTS / "features.json").write_text(json.dumps(result, indent=2))
        for key, v in result.items():
            if isinstance(v, dict):
                print(
                    f"{key}: inline {v['inline']['rps']:,.0f} req/s, entity {v['entity']['rps']:,.0f} "
                    f"req/s ({v['entity_over_inline_rps']:.2f}x), p99 {v['inline']['p99_ms']:.1f} / "
                    f"{v['entity']['p99_ms']:.1f} ms, model batch {v['inline']['mean_batch']:.1f} / "
                    f"{v['entity']['mean_batch']:.1f}, "
                    f"{v['round_trips_per_request']:.3f} round trips per request"
                )
        return 0
    if args.only == "drift":
        result = drift_scenario(registry, args.seconds, args.procs)
        (RESULTS / "drift.json").write_text(json.dumps(result, indent=2))
        on, off = result["on"], result["off"]
        print(
            f"drift streaming off: {off['rps']:,.0f} req/s p99 {off['p99_ms']:.1f} ms; "
            f"on: {on['rps']:,.0f} req/s p99 {on['p99_ms']:.1f} ms; "
            f"ratio {result['rps_on_over_off']:.2f} (target >= 0.95)"
        )
        print(json.dumps(result.get("producer", {}), indent=2))
        return 0
    levels = [int(c) for c in args.concurrency.split(",")]
    print("raw onnxruntime ...", flush=True)
    raw = raw_onnxruntime(registry)
    points: list[Point] = []
    echo = start_echo()
    try:
        for call in ("unary", "stream"):
            for c in (1, 64):
                points.append(load(echo, "echo", "echo", call, c, args.seconds, args.procs))
                print(f"echo {call} c={c}: {points[-1].rps:,.0f} req/s", flush=True)
    finally:
        echo.stop()
    for batching in (False, True):
        name = "on" if batching else "off"
        server = start_batchline(registry, batching)
        try:
            for model in MODELS:
                for call in ("unary", "stream"):
                    for c in levels:
                        p = load(server, name, model, call, c, args.seconds, args.procs)
                        points.append(p)
                        print(
                            f"batching {name} {model} {call} c={c}: {p.rps:,.0f} req/s p99 {p.p99_ms:.2f} ms batch {p.mean_batch:.1f}",
                            flush=True,
                        )
        finally:
            code = server.stop()
            if code != 0:
                print(f"batchline exited with {code}", file=sys.stderr)
    print("entity-keyed features vs inline ...", flush=True)
    entity = entity_scenario(registry, args.seconds, args.procs)
    print("one shadow on vs off ...", flush=True)
    shadow = shadow_scenario(registry, args.seconds, args.procs)
    goals = targets(points)
    goals.append({
        "target": "churn c=64 unary: entity-keyed / inline features req/s",
        "measured": entity["entity_over_inline_rps"], "goal": ">= 0.8",
        "met": entity["entity_over_inline_rps"] is not None and entity["entity_over_inline_rps"] >= 0.8,
    })  # fmt: skip
    goals.append({
        "target": "churn c=64: feature round trips per request",
        "measured": entity["round_trips_per_request"], "goal": "<= 0.125",
        "met": entity["round_trips_per_request"] is not None and entity["round_trips_per_request"] <= 0.125,
    })  # fmt: skip
    goals.append({
        "target": "churn c=64 unary: req/s with one shadow / without",
        "measured": shadow["rps_on_over_off"], "goal": ">= 0.9",
        "met": shadow["rps_on_over_off"] is not None and shadow["rps_on_over_off"] >= 0.9,
    })  # fmt: skip
    goals.append({
        "target": "churn c=64 unary: p99 with one shadow / without",
        "measured": shadow["p99_on_over_off"], "goal": "<= 1.1",
        "met": shadow["p99_on_over_off"] is not None and shadow["p99_on_over_off"] <= 1.1,
    })  # fmt: skip
    machine = {
        "cpus": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load generator": f"loadtest (python, {args.procs} process(es)) on the same cores",
        "window_s": args.seconds,
    }
    result = {
        "machine": machine,
        "raw_onnxruntime": raw,
        "points": [asdict(p) for p in points],
        "features": entity,
        "shadow": shadow,
        "targets": goals,
    }
    stamp = time.strftime("%Y%m%dT%H%M%S")
    for name in ("latest.json", f"{stamp}.json"):
        (RESULTS / name).write_text(json.dumps(result, indent=2))
    plotted = plot(points, RESULTS / "throughput_p99.png")
    raw_rows = ["| model | batch 1 | 8 | 64 | 256 (rows/s) |", "|---|---:|---:|---:|---:|"]
    for model in MODELS:
        per = {r["batch"]: r["rows_per_s"] for r in raw if r["model"] == model}
        raw_rows.append(
            f"| {model} | {per[1]:,.0f} | {per[8]:,.0f} | {per[64]:,.0f} | {per[256]:,.0f} |"
        )
    goal_rows = ["| target | measured | goal | met |", "|---|---:|---|---|"]
    for g in goals:
        value = "n/a" if g["measured"] is None else f"{g['measured']:.2f}"
        goal_rows.append(
            f"| {g['target']} | {value} | {g['goal']} | {'yes' if g['met'] else 'no'} |"
        )
    markdown = "\n\n".join(
        [
            f"Measured {time.strftime('%Y-%m-%d')} on {machine['cpus']} cores ({machine['platform']}), "
            f"Python {machine['python']}; {machine['load generator']}; {args.seconds:.0f} s per point. "
            "`make bench` reproduces it.",
            "\n".join(goal_rows),
            "Raw onnxruntime, in-process, one thread:\n\n" + "\n".join(raw_rows),
            table(points),
            "![throughput vs p99](bench/results/throughput_p99.png)" if plotted else "",
        ]
    )
    print("\n" + markdown)
    if not args.no_readme:
        update_readme(markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
