"""`python -m bench.profile`: where batchline's per-request microseconds go, under perf_analyzer.

Method: `batchline serve` (one model, default settings) is driven by perf_analyzer (--async,
1 row per request, concurrency 64 by default) while py-spy samples the server's threads (200 Hz,
Python frames). The server's CPU time over the sampled window, divided by the requests answered
in it (from the server's own counters), is the CPU per request; each sample is put in one stage
by its innermost batchline/onnxruntime frame, and the stage's share of samples times the CPU per
request is its microseconds:

    grpc+loop   samples with no batchline frame below the event loop (grpc.aio's Cython core,
                uvloop, protobuf parsing; and grpc's poller thread)
    transport   server/api/h2/: the native gRPC transport's own Python (frames, HPACK, calls)
    handler     servicer.py's own lines          decode     api/codec.py
    pipeline    pipeline.py, routing, shadow/,   batcher    batching.py (queue, futures, cut)
                breaker
    model       onnxruntime                      metrics    observability/
    encode      api/wire.py                      other      anything else in server/

Writes bench/results/profile.json and prints a table. Needs py-spy (the `bench` extra) and
perf_analyzer (scripts/install_perf_analyzer.sh). One window on a small shared machine: compare
stages, not runs.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.overload import RESULTS, ROOT, metric, start_server
from bench.processes import cpu_seconds

PERF_ANALYZER = ROOT / ".tools" / "perf_analyzer" / "run"

STAGES = (
    ("server/api/h2/", "transport"),
    ("server/api/codec.py", "decode"),
    ("server/api/wire.py", "encode"),
    ("server/api/servicer.py", "handler"),
    ("server/batching.py", "batcher"),
    ("server/pipeline.py", "pipeline"),
    ("server/routing.py", "pipeline"),
    ("server/shadow/", "pipeline"),
    ("server/breaker.py", "pipeline"),
    ("server/observability/", "metrics"),
    ("onnxruntime", "model"),
    ("server/runtime.py", "model"),
)
ORDER = (
    "grpc+loop",
    "transport",
    "handler",
    "decode",
    "pipeline",
    "batcher",
    "model",
    "metrics",
    "encode",
    "other",
)


def stage_of(stack: list[str]) -> str:
    """The stage of one sample: its innermost frame that names a stage (see the docstring)."""
    for frame in reversed(stack):
        where = frame.rsplit("(", 1)[-1]
        for marker, stage in STAGES:
            if marker in where:
                return stage
        if "server/" in where and "server/cli.py" not in where:
            return "other"
    return "grpc+loop"


def breakdown(raw: str) -> dict[str, int]:
    """Samples per stage from py-spy's raw (collapsed) output."""
    counts: collections.Counter[str] = collections.Counter()
    for line in raw.splitlines():
        stack, _, n = line.rstrip().rpartition(" ")
        if not stack or not n.isdigit():
            continue
        counts[stage_of(stack.split(";"))] += int(n)
    return dict(counts)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--registry", default=str(ROOT / "demo-registry"))
    parser.add_argument("--model", default="churn")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--config", default="", help="TOML text for the server (e.g. batching off)")
    args = parser.parse_args()
    if not PERF_ANALYZER.exists():
        raise SystemExit("perf_analyzer is missing: run scripts/install_perf_analyzer.sh")
    server = start_server(Path(args.registry), args.model, "profile", args.config)
    raw_path = RESULTS / ".profile.raw"
    load = subprocess.Popen(
        [str(PERF_ANALYZER), "-m", args.model, "-u", server.address, "-i", "grpc", "--async",
         "--concurrency-range", str(args.concurrency), "--shape", "input:1,15",
         "--measurement-interval", str(int((args.seconds + 10) * 1000)), "-s", "100",
         "--max-trials", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        time.sleep(3)  # warm-up under load
        ok_key = "batchline_requests_total"
        before = metric(server.metrics(), ok_key, status="OK")
        cpu0 = cpu_seconds(server.pid)
        started = time.monotonic()
        subprocess.run(
            [str(Path(sys.executable).parent / "py-spy"), "record", "-p", str(server.pid), "-d",
             str(int(args.seconds)), "-r", "200", "-f", "raw", "-o", str(raw_path), "--nonblocking"],
            check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        wall = time.monotonic() - started
        cpu = cpu_seconds(server.pid) - cpu0
        answered = metric(server.metrics(), ok_key, status="OK") - before
    finally:
        load.kill()
        load.wait()
        server.stop()
    samples = breakdown(raw_path.read_text())
    total = sum(samples.values()) or 1
    us_per_request = 1e6 * cpu / max(answered, 1)
    stages = {
        stage: {
            "share": samples.get(stage, 0) / total,
            "us_per_request": us_per_request * samples.get(stage, 0) / total,
        }
        for stage in ORDER
    }
    document: dict[str, Any] = {
        "settings": {
            "model": args.model,
            "concurrency": args.concurrency,
            "seconds": args.seconds,
            "config": args.config,
            "client": "perf_analyzer --async, 1 row per request",
            "sampler": "py-spy record -r 200 (Python frames, every thread)",
        },
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
        "result": {
            "requests_per_s": answered / wall,
            "server_cpu_us_per_request": us_per_request,
            "samples": total,
            "stages": stages,
        },
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "profile.json").write_text(json.dumps(document, indent=2) + "\n")
    print(
        f"{args.model} c={args.concurrency}: {answered / wall:.0f} req/s, "
        f"{us_per_request:.0f} us server CPU per request ({total} samples)"
    )
    print(f"{'stage':<10} {'share':>7} {'us/req':>8}")
    for stage in ORDER:
        row = stages[stage]
        print(f"{stage:<10} {100 * row['share']:6.1f}% {row['us_per_request']:8.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
