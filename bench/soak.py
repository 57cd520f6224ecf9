"""`python -m bench.soak --minutes 3`: a sustained run that shows whether memory grows.

One `batchline serve` process with both demo models; loadtest processes hold a moderate, paced
load on it for the whole run (churn unary, churn_mlp over ModelStreamInfer with 8 rows, and a
trickle of calls that fail validation, so error paths run too). The server's RSS
(/proc/PID/status VmRSS) is sampled every few seconds. After the warm-up (default one minute)
the report gives the growth (MB and %, first to last post-warm-up sample, each the median of
its neighbourhood) and a least-squares slope in MB/min. Target: no growth after warm-up
(slope <= 0.5 MB/min and growth <= 2 %). bench/results/soak.json and a small table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.overload import RESULTS, ROOT, Server, metric, start_server
from bench.processes import rss_mb

SLOPE_GOAL_MB_PER_MIN = 0.5
GROWTH_GOAL_PCT = 2.0


def loads(server: Server, seconds: float, rps: float) -> list[tuple[str, list[str], Path]]:
    """(name, loadtest arguments, report path) for each stream of load."""
    bad = RESULTS / ".soak-bad-request.json"
    # A tensor whose shape disagrees with its data: INVALID_ARGUMENT, decoded and refused.
    bad.write_text(
        json.dumps(
            {
                "model_name": "churn",
                "inputs": [
                    {
                        "name": "input",
                        "datatype": "FP32",
                        "shape": [1, 15],
                        "contents": {"fp32_contents": [0.0]},
                    }
                ],
            }
        )
    )
    common = ["-z", f"{seconds:.0f}s", "-t", "5s", "-O", "json"]
    stream = "inference.GRPCInferenceService/ModelStreamInfer"
    specs = [
        ("churn unary", ["--model", "churn", "-c", "16", "--rps", str(rps)]),
        (
            "churn_mlp stream x8 rows",
            [
                "--model",
                "churn_mlp",
                "--rows",
                "8",
                "--call",
                stream,
                "-c",
                "8",
                "--rps",
                str(rps / 4),
            ],
        ),
        ("invalid requests", ["-D", str(bad), "-c", "2", "--rps", str(max(1.0, rps / 50))]),
    ]
    out = []
    for i, (name, extra) in enumerate(specs):
        report = RESULTS / f".soak-{i}.json"
        report.unlink(missing_ok=True)
        out.append((name, [server.address, *extra, *common, "-o", str(report)], report))
    return out


def _median_near(values: np.ndarray, at: int, half: int = 2) -> float:
    return float(np.median(values[max(0, at - half) : at + half + 1]))


def analyse(samples: list[tuple[float, float]], warmup_s: float) -> dict[str, Any]:
    t = np.array([s[0] for s in samples])
    mb = np.array([s[1] for s in samples])
    after = t >= warmup_s
    if after.sum() < 3:
        raise RuntimeError("too few samples after the warm-up: run longer or sample more often")
    ta, ma = t[after], mb[after]
    first, last = _median_near(ma, 0), _median_near(ma, len(ma) - 1)
    slope = float(np.polyfit(ta / 60, ma, 1)[0])
    growth = last - first
    return {
        "samples": len(samples),
        "samples_after_warmup": int(after.sum()),
        "rss_start_mb": float(mb[0]),
        "rss_at_warmup_end_mb": first,
        "rss_end_mb": last,
        "rss_max_mb": float(mb.max()),
        "growth_after_warmup_mb": growth,
        "growth_after_warmup_pct": 100 * growth / first,
        "slope_mb_per_min": slope,
        "met": slope <= SLOPE_GOAL_MB_PER_MIN and 100 * growth / first <= GROWTH_GOAL_PCT,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--registry", default=str(ROOT / "demo-registry"))
    parser.add_argument("--minutes", type=float, default=3.0)
    parser.add_argument("--warmup-s", type=float, default=60.0)
    parser.add_argument("--sample-s", type=float, default=2.0)
    parser.add_argument("--rps", type=float, default=800.0, help="churn unary rate; others scale")
    args = parser.parse_args()
    registry = Path(args.registry)
    from registry_client import FileRegistry

    if not registry.exists() or not {"churn", "churn_mlp"} <= set(
        FileRegistry(registry).list_models()
    ):
        from registry_client.demo import build_demo

        print(f"building demo models into {registry} ...", flush=True)
        build_demo(registry)
    seconds = args.minutes * 60
    server = start_server(registry, ("churn", "churn_mlp"), "soak")
    samples: list[tuple[float, float]] = []
    procs: list[tuple[str, subprocess.Popen[bytes], Path]] = []
    try:
        for name, argv, report in loads(server, seconds, args.rps):
            popen = subprocess.Popen(
                [sys.executable, "-m", "loadtest", *argv],
                cwd=ROOT,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
            procs.append((name, popen, report))
        start = time.monotonic()
        print(
            f"soak: {args.minutes:g} min, RSS every {args.sample_s:g}s (pid {server.pid}) ...",
            flush=True,
        )
        next_print = start
        while any(p.poll() is None for _, p, _ in procs):
            now = time.monotonic()
            samples.append((now - start, rss_mb(server.pid)))
            if now >= next_print:
                print(f"  {now - start:6.0f}s  RSS {samples[-1][1]:7.1f} MB", flush=True)
                next_print += 30
            time.sleep(args.sample_s)
            if now - start > seconds + 120:
                raise RuntimeError("loadtest did not finish")
        for name, popen, _ in procs:
            if popen.returncode != 0:
                err = popen.stderr.read().decode() if popen.stderr else ""
                raise RuntimeError(f"loadtest ({name}) failed: {err[-2000:]}")
        counts = server.metrics()
        alive = server.popen.poll() is None
    finally:
        for _, popen, _ in procs:
            if popen.poll() is None:
                popen.kill()
        code = server.stop()
    result = analyse(samples, args.warmup_s)
    load_reports = {}
    for name, _, report in procs:
        data = json.loads(report.read_text())
        load_reports[name] = {
            "rps": data["rps"],
            "count": data["count"],
            "statuses": data["statusCodeDistribution"],
        }
    document = {
        "settings": {
            "minutes": args.minutes,
            "warmup_s": args.warmup_s,
            "sample_s": args.sample_s,
            "churn_unary_rps": args.rps,
            "server": "batchline serve, churn + churn_mlp @production, default settings",
            "goal": f"slope <= {SLOPE_GOAL_MB_PER_MIN} MB/min and growth <= {GROWTH_GOAL_PCT} %",
        },
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
        "result": result,
        "load": load_reports,
        "server": {
            "alive_at_end": alive,
            "exit_code": code,
            "requests_ok": metric(counts, "batchline_requests_total", status="OK"),
            "requests_invalid": metric(
                counts, "batchline_requests_total", status="INVALID_ARGUMENT"
            ),
        },
        "rss_samples": [{"t_s": round(t, 2), "rss_mb": round(m, 2)} for t, m in samples],
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "soak.json").write_text(json.dumps(document, indent=2))
    r = result
    print(
        "\n".join(
            [
                "",
                "| what | value |",
                "|---|---:|",
                f"| run / warm-up | {args.minutes:g} min / {args.warmup_s:.0f} s |",
                f"| RSS at start / end of warm-up / end | {r['rss_start_mb']:.1f} / "
                f"{r['rss_at_warmup_end_mb']:.1f} / {r['rss_end_mb']:.1f} MB |",
                f"| growth after warm-up | {r['growth_after_warmup_mb']:+.2f} MB "
                f"({r['growth_after_warmup_pct']:+.2f} %) |",
                f"| least-squares slope after warm-up | {r['slope_mb_per_min']:+.3f} MB/min |",
                f"| target met | {'yes' if r['met'] else 'no'} ({document['settings']['goal']}) |",
                *(
                    f"| load: {name} | {v['rps']:,.0f} req/s, {v['statuses']} |"
                    for name, v in load_reports.items()
                ),
                f"| server exit after SIGTERM | {code} |",
            ]
        )
    )
    print(f"\nwritten: {RESULTS / 'soak.json'}")
    return 0 if code == 0 and alive else 1


if __name__ == "__main__":
    raise SystemExit(main())
