"""The REST binding against the gRPC binding of the same server, by perf_analyzer.

One `batchline serve` (churn and churn_mlp at production, default settings); perf_analyzer
(sync mode: its --async HTTP mode fails against HTTP/1.1 servers) drives, in turn:

- HTTP with binary tensor data, HTTP with JSON tensors, gRPC unary: at concurrency 64 and 1;
- HTTP (binary) and gRPC together, 32 each, as two perf_analyzer processes at once, reading the
  model's statistics before and after to show the batches both fed.

    python -m bench.rest [--model churn] [--seconds 4] [--registry demo-registry]

Prints a table and the targets' ratios; writes bench/results/rest.json. The machine is small and
shared with the load generator: compare within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from typing import Any

from bench.run import RESULTS, ROOT, Proc, start

PERF_ANALYZER = ROOT / ".tools" / "perf_analyzer" / "run"


def perf(
    protocol: str, url: str, model: str, concurrency: int, seconds: float, *extra: str
) -> subprocess.Popen[str]:
    cmd = [
        str(PERF_ANALYZER), "-m", model, "-u", url, "-i", protocol,
        "--concurrency-range", str(concurrency), "--shape", "input:1,15",
        "--measurement-interval", str(int(seconds * 1000)), "--max-trials", "3",
        "--stability-percentage", "999", *extra,
    ]  # fmt: skip
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def parse(proc: subprocess.Popen[str], label: str) -> dict[str, Any]:
    out, _ = proc.communicate(timeout=300)
    rate = re.search(r"Throughput: ([\d.]+) infer/sec", out)
    p50 = re.search(r"p50 latency: (\d+) usec", out)
    p99 = re.search(r"p99 latency: (\d+) usec", out)
    if proc.returncode != 0 or rate is None:
        raise RuntimeError(f"perf_analyzer ({label}) failed:\n{out[-3000:]}")
    return {
        "label": label,
        "req_per_s": float(rate.group(1)),
        "p50_us": int(p50.group(1)) if p50 else None,
        "p99_us": int(p99.group(1)) if p99 else None,
        "errors": out.lower().count("error"),
    }


BINARY = ("--input-tensor-format", "binary", "--output-tensor-format", "binary")
JSON_TENSORS = ("--input-tensor-format", "json", "--output-tensor-format", "json")


def stats(http_port: int, model: str) -> dict[str, Any]:
    url = f"http://127.0.0.1:{http_port}/v2/models/{model}/stats"
    with urllib.request.urlopen(url, timeout=10) as reply:
        doc: dict[str, Any] = json.load(reply)["model_stats"][0]
    return doc


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="churn")
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--registry", default=str(ROOT / "demo-registry"))
    args = parser.parse_args()
    if not PERF_ANALYZER.exists():
        print("perf_analyzer missing: run scripts/install_perf_analyzer.sh", file=sys.stderr)
        return 2
    server: Proc = start(
        [sys.executable, "-m", "server.cli", "serve", "--registry", args.registry,
         "--model", "churn@production", "--model", "churn_mlp@production",
         "--host", "127.0.0.1", "--grpc-port", "0", "--http-port", "0", "--metrics-port", "0",
         "--log-level", "warning"],
        "rest",
    )  # fmt: skip
    http_port = server.http_port
    try:
        grpc = f"127.0.0.1:{server.port}"
        http = f"127.0.0.1:{http_port}"
        m, s = args.model, args.seconds
        rows = []
        for concurrency in (64, 1):
            rows.append(parse(perf("http", http, m, concurrency, s, *BINARY),
                              f"http binary c={concurrency}"))  # fmt: skip
            rows.append(parse(perf("http", http, m, concurrency, s, *JSON_TENSORS),
                              f"http json c={concurrency}"))  # fmt: skip
            rows.append(parse(perf("grpc", grpc, m, concurrency, s), f"grpc c={concurrency}"))
        before = stats(http_port, m)
        both = [perf("http", http, m, 32, s, *BINARY), perf("grpc", grpc, m, 32, s)]
        mixed = [parse(both[0], "mixed: http binary c=32"), parse(both[1], "mixed: grpc c=32")]
        after = stats(http_port, m)
        rows += mixed
    finally:
        server.stop()
    by = {r["label"]: r for r in rows}
    executions = after["execution_count"] - before["execution_count"]
    rows_run = after["inference_count"] - before["inference_count"]
    summary = {
        "http_binary_over_grpc_c64": by["http binary c=64"]["req_per_s"]
        / by["grpc c=64"]["req_per_s"],
        "json_over_binary_c64": by["http json c=64"]["req_per_s"]
        / by["http binary c=64"]["req_per_s"],
        "http_p50_over_grpc_p50_c1": by["http binary c=1"]["p50_us"] / by["grpc c=1"]["p50_us"],
        "mixed_mean_batch_rows": rows_run / executions if executions else 0.0,
        "mixed_errors": sum(r["errors"] for r in mixed),
    }
    for r in rows:
        print(
            f"{r['label']:26s} {r['req_per_s']:8.0f} req/s   p50 {r['p50_us']:>6} us   "
            f"p99 {r['p99_us']:>6} us"
        )
    for key, value in summary.items():
        print(f"{key:30s} {value:.2f}")
    (RESULTS / "rest.json").write_text(
        json.dumps(
            {
                "when": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "loadavg_after": os.getloadavg(),
                "model": args.model,
                "rows": rows,
                "summary": summary,
            },
            indent=2,
        )
        + "\n"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
