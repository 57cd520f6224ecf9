"""`python -m bench.overload`: load shedding under twice the load the server can carry.

1. Unloaded and capacity: batchline with its default settings, loadtest unary on one model
   (churn): c=1 gives the unloaded p50/p99, c=64 the capacity C (req/s).
2. Overload, twice: batchline with `max_in_flight` / `max_queue_size` / `max_concurrent_rpcs`
   sized by Little's law (C x unloaded p99), shedding in Python only ("python", the default
   native transport), then on the grpcio transport with gRPC core's pending-call cap
   `max_pending_rpcs` as well ("core"). loadtest (its own process) offers
   2 x C req/s with `--rps`; loadtest keeps latencies of successful calls only, so a light probe
   client beside it sends paced calls of its own and records every call's latency by status.

Reported per configuration: offered and admitted req/s, admitted p50/p99 against the unloaded
p99 (target: admitted p99 <= 2 x unloaded p99), each refusal status with its share and probe
latency (target: a millisecond or two, RESOURCE_EXHAUSTED), the server's own counts and CPU.
A table on stdout and bench/results/overload.json, with the settings that produced them.

By default (2+ CPUs) the server is pinned to CPU 0 and the load generator and probe to CPU 1
(`--pin`), so a saturated generator does not steal the server's core; capacity is measured the
same way. The probe still shares its core with the generator. Run it twice and compare.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench.processes import Nginx, Spawned, launch, nginx_binary, pinned, start_nginx
from bench.scrape import metric

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
# CPU sets (taskset lists) for the server and for the load generator and probe; "" = unpinned.
PIN = {"server": "", "client": ""}


# ---- the server ------------------------------------------------------------------------------


Server = Spawned


def start_server(
    registry: Path, model: str | tuple[str, ...], tag: str, config: str = ""
) -> Server:
    """`batchline serve` for the model(s) at @production on free ports; `config` is TOML text."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable, "-m", "server.cli", "serve", "--registry", str(registry),
        "--host", "127.0.0.1", "--grpc-port", "0", "--http-port", "0", "--metrics-port", "0",
        "--log-level", "warning",
    ]  # fmt: skip
    for name in (model,) if isinstance(model, str) else model:
        cmd += ["--model", f"{name}@production"]
    if config:
        path = RESULTS / f".{tag}.toml"
        path.write_text(config)
        cmd += ["--config", str(path)]
    return launch(tag, pinned(cmd, PIN["server"]), RESULTS)


def start_proxy(
    upstream_port: int, max_in_flight: int, tag: str, runtime: Path | None = None
) -> Nginx:
    """nginx (deploy/nginx/batchline.conf.template) on a free port in front of batchline."""
    return start_nginx(
        upstream_port, max_in_flight, runtime or RESULTS / f".nginx-{tag}", PIN["server"]
    )


# ---- load ------------------------------------------------------------------------------------


def percentiles_ms(report: dict[str, Any]) -> dict[float, float]:
    return {p["percentage"]: p["latency"] / 1e6 for p in report["latencyDistribution"]}


def loadtest_inprocess(
    address: str, model: str, concurrency: int, seconds: float, rows: int
) -> dict[str, Any]:
    from loadtest import Options, run

    report = run(
        Options(
            address,
            model=model,
            rows=rows,
            concurrency=concurrency,
            duration_s=seconds,
            skip_first=min(500, concurrency * 8),
            timeout_s=10.0,
        )
    )
    return report.to_dict()


def loadtest_process(
    address: str, case: Case, rps: float, args: argparse.Namespace, out: Path
) -> subprocess.Popen[bytes]:
    cmd = [
        sys.executable, "-m", "loadtest", address, "--model", case.model,
        "--rows", str(case.rows), "-c", str(args.overload_concurrency),
        "--connections", str(max(args.procs, 4)), "--procs", str(args.procs),
        "--rps", f"{rps:.0f}", "-z", f"{args.seconds}s", "-t", "5s", "--skipFirst", "200",
        "-O", "json", "-o", str(out),
    ]  # fmt: skip
    if PIN["client"]:
        cmd = ["taskset", "-c", PIN["client"], *cmd]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


async def probe(
    address: str, case: Case, rps: float, seconds: float, delay: float
) -> list[tuple[str, float]]:
    """Open-loop paced calls (each sent on schedule, not after the previous one ends); every
    call's (status, seconds)."""
    import grpc

    from server._proto import inference_pb2 as pb

    request = pb.ModelInferRequest(model_name=case.model)
    request.inputs.add(name="input", datatype="FP32", shape=[case.rows, 15])
    request.raw_input_contents.append(np.zeros((case.rows, 15), np.float32).tobytes())
    payload = request.SerializeToString()
    out: list[tuple[str, float]] = []
    tasks: set[asyncio.Task[None]] = set()
    async with grpc.aio.insecure_channel(
        address, options=[("grpc.use_local_subchannel_pool", 1)]
    ) as channel:
        call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        await call(payload, timeout=10)  # connected and warm
        await asyncio.sleep(delay)

        async def one() -> None:
            start = time.perf_counter()
            try:
                await call(payload, timeout=5)
                code = "OK"
            except grpc.aio.AioRpcError as exc:
                code = exc.code().name
            out.append((code, time.perf_counter() - start))

        loop = asyncio.get_running_loop()
        t0 = loop.time()
        for i in range(int(rps * seconds)):
            wait = t0 + i / rps - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            task = asyncio.create_task(one())
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        if tasks:
            await asyncio.wait(tasks, timeout=10)
    return out


def probe_baseline(address: str, case: Case, args: argparse.Namespace) -> dict[int, float]:
    """The probe's own latency (p50, p99 of OK calls, ms) against an unloaded server: the
    baseline its overload latencies are compared with."""
    calls = asyncio.run(probe(address, case, args.probe_rps, max(1.0, args.seconds - 2), 0.5))
    ok = [seconds for status, seconds in calls if status == "OK"]
    return {50: _pct(ok, 50) or math.nan, 99: _pct(ok, 99) or math.nan}


def _pct(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) * 1000 if values else None


# ---- the benchmark ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One overload experiment: a model, rows per request and model settings (TOML lines)."""

    name: str
    model: str
    rows: int = 1
    model_settings: str = ""


CASES = {
    # The brief's case: a model that costs microseconds, so the gRPC layer is the bottleneck.
    "churn": Case("churn, 1 row (RPC-bound)", "churn"),
    # A model that costs milliseconds, run off the event loop: the model is the bottleneck.
    "churn_mlp": Case(
        "churn_mlp, 32 rows, executor (model-bound)",
        "churn_mlp",
        rows=32,
        model_settings='execution = "executor"\n',
    ),
}


def baseline(case: Case, args: argparse.Namespace, config: str, front: bool) -> dict[str, Any]:
    """Unloaded (loadtest c=1, and the probe) and capacity (loadtest at --concurrency) of a
    server with `config`, directly or through nginx with no limit (its own path, measured)."""
    tag = "front-base" if front else "base"
    server = start_server(Path(args.registry), case.model, f"overload-{tag}", config)
    proxy = None
    try:
        if front:
            proxy = start_proxy(server.grpc_port, 65535, tag)  # nginx's largest: no limit
        address = proxy.address if proxy is not None else server.address
        unloaded = loadtest_inprocess(address, case.model, 1, args.seconds, case.rows)
        probed = probe_baseline(address, case, args)
        capacity = loadtest_inprocess(
            address, case.model, args.concurrency, args.seconds, case.rows
        )
    finally:
        if proxy is not None:
            proxy.stop()
        server.stop()
    unloaded_pct, capacity_pct = percentiles_ms(unloaded), percentiles_ms(capacity)
    print(
        f"  {'through nginx' if front else 'direct'}: unloaded (c=1) p50 "
        f"{unloaded_pct[50]:.2f} ms, p99 {unloaded_pct[99]:.2f} ms; capacity "
        f"(c={args.concurrency}) {capacity['rps']:,.0f} req/s, p99 {capacity_pct[99]:.2f} ms",
        flush=True,
    )
    return {
        "unloaded": {
            "rps": unloaded["rps"],
            "p50_ms": unloaded_pct[50],
            "p99_ms": unloaded_pct[99],
            "probe_p50_ms": probed[50],
            "probe_p99_ms": probed[99],
        },
        "capacity": {
            "rps": capacity["rps"],
            "p50_ms": capacity_pct[50],
            "p99_ms": capacity_pct[99],
            "statuses": capacity["statusCodeDistribution"],
        },
    }


def in_flight_limit(base: dict[str, Any], args: argparse.Namespace) -> int:
    """Little's law: requests in the server = rate x time there. Admitting what capacity x the
    unloaded p99 holds keeps an admitted request's wait near one unloaded p99."""
    rps, p99_ms = base["capacity"]["rps"], base["unloaded"]["p99_ms"]
    return int(args.max_in_flight or max(1, math.ceil(rps * p99_ms / 1000)))


def measure(case: Case, args: argparse.Namespace) -> dict[str, Any]:
    model = case.model
    base_config = (
        f'[models.{model}]\nref = "{model}@production"\n{case.model_settings}'
        if case.model_settings
        else ""
    )
    print(f"{case.name}: unloaded and capacity with default admission settings ...", flush=True)
    direct = baseline(case, args, base_config, front=False)
    max_in_flight = in_flight_limit(direct, args)
    max_queue_size = args.max_queue_size or max_in_flight * case.rows
    concurrent = max_in_flight if args.max_concurrent_rpcs < 0 else args.max_concurrent_rpcs
    model_lines = (
        f'[models.{model}]\nref = "{model}@production"\n{case.model_settings}'
        f"max_in_flight = {max_in_flight}\nmax_queue_size = {max_queue_size}\n"
    )
    # Two ways to shed: in Python only, on the default (native) transport, where every call
    # reaches Python as soon as its headers are read and every refusal is RESOURCE_EXHAUSTED;
    # and on the grpcio transport with gRPC core's pending-call cap (refused before Python,
    # fast, but gRPC core answers those CANCELLED; only grpcio has that queue).
    configs = {
        "python": f"[server]\nmax_concurrent_rpcs = {concurrent}\n{model_lines}",
        "core": (
            f'[server]\ngrpc_transport = "grpcio"\nmax_concurrent_rpcs = {concurrent}\n'
            f"max_pending_rpcs = {args.max_pending_rpcs}\n{model_lines}"
        ),
    }
    overload = {
        label: shed_phase(case, args, config, label, direct) for label, config in configs.items()
    }
    front: dict[str, Any] = {}
    if args.proxy and nginx_binary() is None:
        print("  (no nginx installed: the nginx-front configuration is skipped)", flush=True)
    elif args.proxy:
        # The third way: nginx in front (deploy/nginx) refuses in C; batchline keeps defaults.
        # Its own baseline, through the proxy, since the proxy is part of the path measured.
        front = baseline(case, args, base_config, front=True)
        front["nginx_max_in_flight"] = limit = in_flight_limit(front, args)
        configs["nginx"] = base_config or "(batchline defaults)"
        overload["nginx"] = shed_phase(case, args, base_config, "nginx", front, limit)
    return {
        "case": case.name,
        "settings": {
            "model": model,
            "rows_per_request": case.rows,
            "capacity_concurrency": args.concurrency,
            "window_s": args.seconds,
            "factor": args.factor,
            "overload_concurrency": args.overload_concurrency,
            "loadtest_procs": args.procs,
            "probe_rps": args.probe_rps,
            "pinned": args.pin or "no",
            "capacity_config": base_config or "(none: defaults)",
            "overload_configs": configs,
        },
        "unloaded": direct["unloaded"],
        "capacity": direct["capacity"],
        "overload": overload,
        "through_nginx": front,
    }


def shed_phase(
    case: Case,
    args: argparse.Namespace,
    config: str,
    label: str,
    base: dict[str, Any],
    proxy_limit: int | None = None,
) -> dict[str, Any]:
    """Offer factor x capacity to a server started with `config` (behind nginx admitting
    `proxy_limit` calls at once, when given); what was admitted, what refused, how fast,
    against `baseline`'s numbers for the same path."""
    capacity_rps = base["capacity"]["rps"]
    unloaded_p99 = base["unloaded"]["p99_ms"]
    probe_unloaded_p99 = base["unloaded"]["probe_p99_ms"]
    offered = capacity_rps * args.factor
    print(f"  overload ({label}): {offered:,.0f} req/s offered ...", flush=True)
    shed = start_server(Path(args.registry), case.model, f"overload-{label}", config)
    try:
        proxy = start_proxy(shed.grpc_port, proxy_limit, label) if proxy_limit else None
    except BaseException:
        shed.stop()
        raise
    address = proxy.address if proxy is not None else shed.address
    out = RESULTS / ".overload-loadtest.json"
    out.unlink(missing_ok=True)
    try:
        before = shed.metrics()
        cpu0 = shed.cpu_seconds() + (proxy.cpu_seconds() if proxy is not None else 0.0)
        wall0 = time.monotonic()
        proc = loadtest_process(address, case, offered, args, out)
        probed = asyncio.run(
            probe(address, case, args.probe_rps, max(1.0, args.seconds - 2.0), delay=1.5)
        )
        _, err = proc.communicate(timeout=args.seconds + 120)
        if proc.returncode != 0:
            raise RuntimeError(f"loadtest failed: {err.decode()[-2000:]}")
        cpu1 = shed.cpu_seconds() + (proxy.cpu_seconds() if proxy is not None else 0.0)
        server_cpu = (cpu1 - cpu0) / (time.monotonic() - wall0)
        after = shed.metrics()
    finally:
        if proxy is not None:
            proxy.stop()
        code = shed.stop()
    if code != 0:
        print(f"batchline exited with {code}; see {shed.log}", file=sys.stderr)
    report = json.loads(out.read_text())
    window_s = report["total"] / 1e9
    statuses = report["statusCodeDistribution"]
    count = report["count"]
    ok = statuses.get("OK", 0)
    refused = count - ok
    admitted_pct = percentiles_ms(report) if ok else {}
    by_status: dict[str, list[float]] = {}
    for status, seconds in probed:
        by_status.setdefault(status, []).append(seconds)

    def delta(name: str, **labels: str) -> float:
        return metric(after, name, **labels) - metric(before, name, **labels)

    admitted_p99 = admitted_pct.get(99)
    refusals = [s for c, v in by_status.items() if c != "OK" for s in v]
    probe_ok_p99 = _pct(by_status.get("OK", []), 99)
    refused_p99 = _pct(refusals, 99)
    return {
        "offered_target_rps": offered,
        "offered_rps": count / window_s,
        "admitted_rps": ok / window_s,
        "admitted_over_capacity": ok / window_s / capacity_rps,
        "refused_rps": refused / window_s,
        "refused_share": refused / count if count else None,
        "statuses": statuses,
        "admitted_p50_ms": admitted_pct.get(50),
        "admitted_p99_ms": admitted_p99,
        "probe_calls": len(probed),
        "probe_statuses": {c: len(v) for c, v in by_status.items()},
        "probe_p50_ms": {c: _pct(v, 50) for c, v in by_status.items()},
        "probe_p99_ms": {c: _pct(v, 99) for c, v in by_status.items()},
        "server_cpu_share": server_cpu,
        "server_rejected_in_flight_cap": delta(
            "batchline_dropped_requests_total", reason="in_flight_cap"
        ),
        "server_rejected_queue_full": delta(
            "batchline_dropped_requests_total", reason="queue_full"
        ),
        "server_ok": delta("batchline_requests_total", status="OK"),
        "targets": [
            {
                # The probe against itself: same client, same pacing, unloaded and under
                # overload. loadtest's own numbers are kept too, but under overload its process
                # saturates its core and its latencies include its own scheduling.
                "target": "admitted p99 / unloaded p99 (probe)",
                "measured": None if probe_ok_p99 is None else probe_ok_p99 / probe_unloaded_p99,
                "goal": "<= 2.0",
                "met": None if probe_ok_p99 is None else probe_ok_p99 <= 2 * probe_unloaded_p99,
            },
            {
                "target": "admitted p99 / unloaded p99 (loadtest)",
                "measured": None if admitted_p99 is None else admitted_p99 / unloaded_p99,
                "goal": "<= 2.0",
                "met": None if admitted_p99 is None else admitted_p99 <= 2 * unloaded_p99,
            },
            {
                "target": "refused p99 (ms, probe, any refusal status)",
                "measured": refused_p99,
                "goal": "<= 2.0",
                "met": None if refused_p99 is None else refused_p99 <= 2.0,
            },
            {
                "target": "every refusal is RESOURCE_EXHAUSTED",
                "measured": statuses.get("RESOURCE_EXHAUSTED", 0) / refused if refused else None,
                "goal": "= 1.0",
                "met": None if not refused else statuses.get("RESOURCE_EXHAUSTED", 0) == refused,
            },
        ],
    }


def _f(value: float | None, fmt: str = ".2f") -> str:
    return "n/a" if value is None else format(value, fmt)


def table(r: dict[str, Any]) -> str:
    u, c = r["unloaded"], r["capacity"]
    lines = [
        f"### {r['case']}",
        "",
        "| phase | req/s | p50 ms | p99 ms | notes |",
        "|---|---:|---:|---:|---|",
        f"| unloaded (c=1) | {u['rps']:,.0f} | {u['p50_ms']:.2f} | {u['p99_ms']:.2f} | |",
        f"| unloaded, probe | {r['settings']['probe_rps']:,.0f} | {u['probe_p50_ms']:.2f} | {u['probe_p99_ms']:.2f} | the probe's baseline (paced, open loop) |",
        f"| capacity (c={r['settings']['capacity_concurrency']}) | {c['rps']:,.0f} | {c['p50_ms']:.2f} | {c['p99_ms']:.2f} | |",
    ]
    if r.get("through_nginx"):
        fu, fc = r["through_nginx"]["unloaded"], r["through_nginx"]["capacity"]
        lines += [
            f"| via nginx: unloaded (c=1) | {fu['rps']:,.0f} | {fu['p50_ms']:.2f} | {fu['p99_ms']:.2f} | the nginx configuration's baseline |",
            f"| via nginx: unloaded, probe | {r['settings']['probe_rps']:,.0f} | {fu['probe_p50_ms']:.2f} | {fu['probe_p99_ms']:.2f} | |",
            f"| via nginx: capacity (c={r['settings']['capacity_concurrency']}) | {fc['rps']:,.0f} | {fc['p50_ms']:.2f} | {fc['p99_ms']:.2f} | nginx admits {r['through_nginx']['nginx_max_in_flight']} at once under overload |",
        ]
    for label, o in r["overload"].items():
        lines += [
            f"| {label}: offered | {o['offered_rps']:,.0f} | | | target {o['offered_target_rps']:,.0f} ({r['settings']['factor']:g} x capacity) |",
            f"| {label}: admitted (OK) | {o['admitted_rps']:,.0f} | {_f(o['admitted_p50_ms'])} | {_f(o['admitted_p99_ms'])} | loadtest; {100 * o['admitted_over_capacity']:.0f} % of capacity |",
        ]
        for status in sorted(o["probe_statuses"]):
            n = o["statuses"].get(status, 0)
            lines.append(
                f"| {label}: {status} | {n / max(1, sum(o['statuses'].values())) * 100:.1f} % | "
                f"{_f(o['probe_p50_ms'][status])} | {_f(o['probe_p99_ms'][status])} | "
                f"probe ({o['probe_statuses'][status]} calls) |"
            )
    lines += ["", "| config | target | measured | goal | met |", "|---|---|---:|---|---|"]
    for label, o in r["overload"].items():
        for t in o["targets"]:
            met = "n/a" if t["met"] is None else "yes" if t["met"] else "no"
            lines.append(f"| {label} | {t['target']} | {_f(t['measured'])} | {t['goal']} | {met} |")
    lines.append("")
    for label, config in r["settings"]["overload_configs"].items():
        o = r["overload"][label]
        lines.append(
            f"{label}: {config.strip().replace(chr(10), '; ')}. Server CPU "
            f"{100 * o['server_cpu_share']:.0f} % of a core; it counted {o['server_ok']:.0f} OK, "
            f"{o['server_rejected_in_flight_cap']:.0f} over max_in_flight, "
            f"{o['server_rejected_queue_full']:.0f} queue full."
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--registry", default=str(ROOT / "demo-registry"))
    parser.add_argument(
        "--cases", default="churn,churn_mlp", help=f"comma-separated, of {', '.join(CASES)}"
    )
    parser.add_argument("--seconds", type=float, default=6.0, help="measured window per phase")
    parser.add_argument("--concurrency", type=int, default=64, help="capacity measurement")
    parser.add_argument("--factor", type=float, default=2.0, help="offered load / capacity")
    parser.add_argument(
        "--overload-concurrency", type=int, default=256, help="loadtest workers under overload"
    )
    parser.add_argument("--procs", type=int, default=1, help="loadtest processes under overload")
    parser.add_argument("--probe-rps", type=float, default=200.0)
    parser.add_argument(
        "--max-in-flight", type=int, default=0, help="0: capacity x unloaded p99 (Little's law)"
    )
    parser.add_argument(
        "--max-queue-size", type=int, default=0, help="rows; 0: max_in_flight x rows"
    )
    parser.add_argument(
        "--pin",
        default="0/1" if (os.cpu_count() or 1) >= 2 else "",
        help="SERVER_CPUS/CLIENT_CPUS (taskset lists), e.g. 0/1: the server on its own core",
    )
    parser.add_argument(
        "--no-proxy",
        dest="proxy",
        action="store_false",
        help="skip the nginx-fronted configuration (it runs when nginx is installed)",
    )
    parser.add_argument(
        "--max-concurrent-rpcs",
        type=int,
        default=-1,
        help="[server] max_concurrent_rpcs; -1: max_in_flight, 0: unset",
    )
    parser.add_argument(
        "--max-pending-rpcs",
        type=int,
        default=1,
        help="[server] max_pending_rpcs for the 'core' configuration",
    )
    args = parser.parse_args()
    if args.pin:
        PIN["server"], PIN["client"] = args.pin.split("/")
        os.sched_setaffinity(0, {int(c) for c in PIN["client"].split(",")})
    cases = [CASES[name] for name in args.cases.split(",")]
    registry = Path(args.registry)
    from registry_client import FileRegistry

    needed = {case.model for case in cases}
    if not registry.exists() or not needed <= set(FileRegistry(registry).list_models()):
        from registry_client.demo import build_demo

        print(f"building demo models into {registry} ...", flush=True)
        build_demo(registry)
    results = [measure(case, args) for case in cases]
    document = {
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "load generator": "loadtest (own process) and the probe"
            + (
                f"; server on CPU {PIN['server']}, clients on CPU {PIN['client']}"
                if PIN["server"]
                else ", on the server's cores"
            ),
        },
        "cases": results,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "overload.json").write_text(json.dumps(document, indent=2))
    for result in results:
        print("\n" + table(result))
    print(f"\nwritten: {RESULTS / 'overload.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
