"""`python -m bench.reload_soak --reloads 50`: does hot reload leak retired versions?

One `batchline serve` process serving churn_mlp (the ~8 MB 3x1024 MLP); a paced loadtest holds
traffic on it for the whole run. Every few seconds `AdminService.ReloadModel` swaps it between
version 1 and a version 2 registered from the same artifact (so the two cost the same), then 20
more requests run, and the server's RSS (/proc/PID/status VmRSS) is read just before the next
reload, once the previous version has been retired. The report: RSS after every reload, the
growth from reload 4 to reload 24 and to the last, and a least-squares slope over reloads 4..N.
Target (issue #13): within 40 MiB of reload 4 at reload 24; flat after warm-up.
bench/results/reload_soak.json and a table on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from bench.overload import RESULTS, ROOT, start_server
from bench.processes import rss_mb

GOAL_MB = 40.0


def _registry_with_two_versions(source: Path, into: Path) -> Path:
    """A copy of the demo registry whose churn_mlp has a version 2 (v1's artifact again)."""
    from registry_client import FileRegistry

    if not source.exists() or "churn_mlp" not in FileRegistry(source).list_models():
        from registry_client.demo import build_demo

        print(f"building demo models into {source} ...", flush=True)
        build_demo(source)
    shutil.copytree(source, into)
    registry = FileRegistry(into)
    versions = registry.list_versions("churn_mlp")
    if len(versions) < 2:
        v1 = versions[0]
        folder = Path(v1.artifact).parent
        attachments = {
            p.name: p
            for p in folder.iterdir()
            if p.is_file() and p.name not in ("model.onnx", "metadata.json")
        }
        registry.register(
            "churn_mlp",
            Path(v1.artifact),
            signature=v1.signature,
            features=v1.features,
            attachments=attachments,
            source="bench.reload_soak: v1's artifact again",
        )
    return into


def _infer(channel: grpc.Channel, n: int) -> None:
    from server._proto import inference_pb2 as pb
    from server._proto import inference_pb2_grpc as pb_grpc

    stub = pb_grpc.GRPCInferenceServiceStub(channel)
    request = pb.ModelInferRequest(model_name="churn_mlp")
    request.inputs.add(name="input", datatype="FP32", shape=[1, 15])
    request.raw_input_contents.append(np.zeros((1, 15), np.float32).tobytes())
    for _ in range(n):
        stub.ModelInfer(request, timeout=30)


def _versions_with_series(server: Any) -> set[str]:
    return {
        dict(labels)["version"]
        for name, labels in server.metrics()
        if name == "batchline_queue_rows" and dict(labels).get("model") == "churn_mlp"
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--registry", default=str(ROOT / "demo-registry"))
    parser.add_argument("--reloads", type=int, default=50)
    parser.add_argument("--rps", type=float, default=200.0, help="background churn_mlp rate")
    args = parser.parse_args()
    if args.reloads < 4:
        parser.error("--reloads: at least 4 (growth is measured from reload 4, after warm-up)")
    from server._proto import admin_pb2 as admin
    from server._proto import admin_pb2_grpc as admin_grpc

    work = Path(tempfile.mkdtemp(prefix="batchline-reload-soak-"))
    registry = _registry_with_two_versions(Path(args.registry), work / "registry")
    server = start_server(registry, "churn_mlp", "reload-soak")
    report = RESULTS / ".reload-soak-load.json"
    load = subprocess.Popen(
        [sys.executable, "-m", "loadtest", "--model", "churn_mlp", "-c", "4",
         "--rps", str(args.rps), "-z", f"{max(60, args.reloads * 3)}s", "-t", "30s",
         "-O", "json", "-o", str(report), server.address],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    rss: list[float] = []
    swaps: list[str] = []
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = admin_grpc.AdminServiceStub(channel)
            _infer(channel, 200)  # warm
            print(f"reload soak: {args.reloads} reloads (pid {server.pid}) ...", flush=True)
            for i in range(1, args.reloads + 1):
                ref = f"churn_mlp@{2 if i % 2 else 1}"
                reply = stub.ReloadModel(
                    admin.ReloadModelRequest(model="churn_mlp", ref=ref), timeout=120
                )
                swaps.append(reply.version)
                _infer(channel, 20)
                # The old version is retired once its queue drains, and its metric series go
                # last: wait until only the served version has one.
                deadline = time.monotonic() + 30
                while _versions_with_series(server) != {reply.version}:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"reload {i}: the old version was never retired")
                    time.sleep(0.05)
                rss.append(rss_mb(server.pid))
                if i % 5 == 0 or i <= 4:
                    print(f"  reload {i:3d} -> v{reply.version}  RSS {rss[-1]:7.1f} MB", flush=True)
        alive = server.popen.poll() is None
    finally:
        load.kill()
        code = server.stop()
        shutil.rmtree(work, ignore_errors=True)
    at = {n: rss[n - 1] for n in (4, 24, len(rss)) if n <= len(rss)}
    tail = np.array(rss[3:])
    slope = float(np.polyfit(np.arange(len(tail)), tail, 1)[0]) if len(tail) >= 2 else 0.0
    growth_24 = at.get(24, float("nan")) - at[4]
    result: dict[str, Any] = {
        "rss_mb_per_reload": [round(x, 2) for x in rss],
        "rss_at_reload_4_mb": at[4],
        "rss_at_reload_24_mb": at.get(24),
        "rss_at_last_mb": rss[-1],
        "growth_4_to_24_mb": growth_24,
        "growth_4_to_last_mb": rss[-1] - at[4],
        "slope_mb_per_reload_after_4": slope,
        "met": bool(growth_24 <= GOAL_MB),
        "versions": swaps,
    }
    document = {
        "settings": {
            "reloads": args.reloads,
            "background_rps": args.rps,
            "model": "churn_mlp (3x1024 MLP), v1 <-> v2 (same artifact)",
            "goal": f"RSS at reload 24 within {GOAL_MB:g} MB of reload 4",
        },
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
        "result": result,
        "server": {"alive_at_end": alive, "exit_code": code},
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "reload_soak.json").write_text(json.dumps(document, indent=2) + "\n")
    print(
        f"RSS reload 4 {at[4]:.1f} MB, reload 24 {at.get(24, float('nan')):.1f} MB "
        f"(+{growth_24:.1f}), reload {len(rss)} {rss[-1]:.1f} MB (+{rss[-1] - at[4]:.1f}); "
        f"slope {slope:+.2f} MB/reload; goal <= {GOAL_MB:g} MB: "
        f"{'met' if result['met'] else 'MISSED'}"
    )
    return 0 if alive and code == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
