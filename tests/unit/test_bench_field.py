"""The pure parts of `python -m bench.field`: perf_analyzer's CSV, CPU accounting, the targets."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import pytest

from bench.field import (
    README_MARKERS,
    Point,
    cores_used,
    measurement_plan,
    parse_perf_csv,
    perf_analyzer_cmd,
    replace_block,
    targets,
)

# Copied from perf_analyzer 2.41 runs here: against Triton (server-side columns from its
# statistics) and against a server without the statistics extension.
TRITON_CSV = (
    "Concurrency,Inferences/Second,Client Send,Network+Server Send/Recv,Server Queue,"
    "Server Compute Input,Server Compute Infer,Server Compute Output,Client Recv,"
    "p50 latency,p90 latency,p95 latency,p99 latency\n"
    "16,3642.93,4,692,1476,145,799,1065,1,3617,6059,7352,13706\n"
)
PLAIN_CSV = (
    "Concurrency,Inferences/Second,Client Send,Client Recv,p50 latency,p90 latency,"
    "p95 latency,p99 latency\n"
    "1,2458.1,3,1,340,420,610,1320\n"
    "64,3794.5,4,1,13950,30000,40000,48260\n"
)


def test_perf_csv_with_server_columns_is_read_by_name() -> None:
    (row,) = parse_perf_csv(TRITON_CSV)
    assert row.concurrency == 16
    assert row.throughput == pytest.approx(3642.93)
    assert (row.p50_us, row.p90_us, row.p95_us, row.p99_us) == (3617, 6059, 7352, 13706)


def test_perf_csv_without_server_columns_gives_one_row_per_level() -> None:
    rows = parse_perf_csv(PLAIN_CSV)
    assert [r.concurrency for r in rows] == [1, 64]
    assert rows[1].throughput == pytest.approx(3794.5)
    assert rows[1].p99_us == 48260


@pytest.mark.parametrize(
    "text",
    [
        "",
        "Concurrency,Inferences/Second\n",  # header only
        "Concurrency,Inferences/Second\n1,100\n",  # no latency columns
        PLAIN_CSV.replace("3794.5", "fast"),
    ],
)
def test_perf_csv_that_is_not_a_report_is_rejected(text: str) -> None:
    with pytest.raises(ValueError, match="perf_analyzer CSV"):
        parse_perf_csv(text)


def test_cores_used_leaves_out_ramp_up_and_drain() -> None:
    # Server at 0.5 cores and client at 0.25 from t=1 to t=9; idle before and after.
    samples = [(0.0, 0.0, 0.0), (0.5, 0.0, 0.0)]
    samples += [(1.0 + i, 0.5 * i, 0.25 * i) for i in range(9)]
    samples += [(9.5, 4.0, 2.0), (10.0, 4.0, 2.0)]
    server, client, span = cores_used(samples, lead_s=1.0, tail_s=1.0)
    assert server == pytest.approx(0.5)
    assert client == pytest.approx(0.25)
    assert span == pytest.approx(8.0)


def test_cores_used_falls_back_to_the_whole_run_when_it_is_short() -> None:
    samples = [(0.0, 0.0, 0.0), (0.4, 0.2, 0.1)]
    server, client, span = cores_used(samples, lead_s=1.0, tail_s=1.0)
    assert (server, client, span) == pytest.approx((0.5, 0.25, 0.4))


def test_cores_used_needs_two_samples() -> None:
    assert cores_used([(0.0, 1.0, 1.0)], 0.0, 0.0) is None


def point(server: str, model: str, call: str, c: int, **kw: Any) -> Point:
    return Point(server, model, call, c, **kw)


def test_targets_are_ratios_of_the_named_rows() -> None:
    points = [
        point("echo", "-", "unary", 64, rps=1000.0, server_us_per_request=900.0),
        point("echo-native", "-", "unary", 64, rps=2700.0, server_us_per_request=440.0),
        point("naive", "churn", "unary", 64, rps=2000.0),
        point("naive", "churn", "unary", 1, rps=900.0, p50_ms=1.0),
        point("batchline", "churn", "unary", 64, rps=2430.0, server_us_per_request=550.0),
        point("batchline", "churn", "unary", 1, rps=800.0, p50_ms=1.2),
        point("batchline", "churn", "stream", 64, rps=3500.0),
        point("triton", "churn", "unary", 64, rps=3500.0),
        point("batchline", "churn_mlp", "unary", 64, rps=1000.0),
        point("triton", "churn_mlp", "unary", 64, rps=2000.0),
        point("batchline", "churn", "http", 64, rps=4000.0),
        point("batchline", "churn", "http", 1, rps=900.0, p50_ms=1.1),
        point("batchline", "churn", "http-json", 64, rps=2000.0),
        point("triton", "churn", "http", 64, rps=3600.0),
        point("batchline-nobatch", "churn", "unary", 64, rps=2400.0, server_us_per_request=560.0),
    ]
    got = {t["target"]: t for t in targets(points)}
    expected = {
        "churn c=64 unary req/s: batchline / batchline-nobatch": (2430 / 2400, False),  # < 1.05
        "churn c=64 unary server CPU per request: batchline / batchline-nobatch": (
            550 / 560,
            False,
        ),
        "churn c=64 unary req/s: batchline / echo": (2430 / 1000, True),
        "churn c=64 unary server CPU per request: batchline / echo": (550 / 900, True),
        "churn c=64 unary req/s: batchline / echo-native": (2430 / 2700, True),  # 0.90 >= 0.9
        "churn c=64 unary req/s: batchline / naive": (2430 / 2000, True),
        "churn c=1 unary p50: batchline / naive": (1.2 / 1.0, False),  # 1.2 > 1.1
        "churn c=64 req/s: batchline ModelStreamInfer / Triton unary": (1.0, True),
        "churn_mlp c=64 unary req/s: batchline / Triton": (0.5, False),
        "churn c=64 unary server CPU per request: batchline / echo-native": (550 / 440, False),
        "churn c=64 req/s: batchline HTTP (binary) / Triton HTTP": (4000 / 3600, True),
        "churn c=64 req/s: batchline HTTP (binary) / batchline gRPC unary": (4000 / 2430, True),
        "churn c=64 req/s: batchline HTTP JSON / HTTP binary": (0.5, False),  # < 0.6
        "churn c=1 p50: batchline HTTP (binary) / batchline gRPC unary": (1.1 / 1.2, True),
    }
    assert set(got) == set(expected)
    for name, (ratio, met) in expected.items():
        assert got[name]["measured"] == pytest.approx(ratio), name
        assert got[name]["met"] is met, name
        assert got[name]["note"] == ""


def test_a_missing_or_failed_row_makes_its_target_not_applicable() -> None:
    points = [
        point("echo-native", "-", "unary", 64, rps=2700.0),
        point("batchline", "churn", "unary", 64, error="perf_analyzer exit 99: refused"),
    ]
    got = {t["target"]: t for t in targets(points)}
    first = got["churn c=64 unary req/s: batchline / echo-native"]
    assert first["measured"] is None
    assert first["met"] is None


def test_a_saturated_client_is_named_in_the_target_note() -> None:
    points = [
        point("echo-native", "-", "unary", 64, rps=2700.0, client_saturated=True),
        point("batchline", "churn", "unary", 64, rps=2000.0, client_saturated=False),
    ]
    first = {t["target"]: t for t in targets(points)}[
        "churn c=64 unary req/s: batchline / echo-native"
    ]
    assert first["note"] == "client saturated (echo-native)"


def test_throughput_targets_also_compare_per_server_core() -> None:
    # batchline got half a core (a busy machine): 1,000 req/s at 500 us each; echo a whole
    # core: 2,500 req/s at 400 us each. Per core, batchline does 1/500 vs echo's 1/400.
    points = [
        point("echo-native", "-", "unary", 64, rps=2500.0, server_us_per_request=400.0,
              server_cores=1.0),
        point("batchline", "churn", "unary", 64, rps=1000.0, server_us_per_request=500.0,
              server_cores=0.5),
    ]  # fmt: skip
    first = {t["target"]: t for t in targets(points)}[
        "churn c=64 unary req/s: batchline / echo-native"
    ]
    assert first["measured"] == pytest.approx(0.4)
    assert first["per_core"] == pytest.approx(400 / 500)
    assert first["note"] == "server under 0.85 cores (batchline)"


def test_replace_block_swaps_only_the_field_table() -> None:
    begin, end = README_MARKERS
    text = f"intro\n{begin}\nold\n{end}\n<!-- bench-table -->\nkeep\n<!-- /bench-table -->\n"
    out = replace_block(text, "new table")
    assert out == f"intro\n{begin}\nnew table\n{end}\n<!-- bench-table -->\nkeep\n<!-- /bench-table -->\n"  # fmt: skip


def test_replace_block_without_markers_names_them() -> None:
    with pytest.raises(ValueError, match="field-table"):
        replace_block("no markers here", "table")


def test_http_points_drive_perf_analyzer_over_http_in_sync_mode() -> None:
    def cmd(call: str) -> list[str]:
        return perf_analyzer_cmd(8000, "churn", 64, call, 500, 3, Path("r.csv"), None, None)

    binary, json_, grpc_ = cmd("http"), cmd("http-json"), cmd("unary")
    assert binary[binary.index("-i") + 1] == "http"
    assert "--async" not in binary  # sync: one thread and connection per concurrent request
    assert "--streaming" not in binary
    assert "--input-tensor-format" not in binary  # perf_analyzer's default: binary both ways
    assert json_[json_.index("--input-tensor-format") + 1] == "json"
    assert json_[json_.index("--output-tensor-format") + 1] == "json"
    assert grpc_[grpc_.index("-i") + 1] == "grpc"
    assert "--async" in grpc_


def test_http_rows_are_planned_for_batchline_and_triton_on_churn_only() -> None:
    args = argparse.Namespace(levels=[1, 64], stream_levels=[64], http_levels=[1, 64],
                              http_json_levels=[64])  # fmt: skip
    plan, skipped = measurement_plan("batchline", ["churn", "churn_mlp"], args)
    http = [(m, call, c) for m, call, c in plan if call.startswith("http")]
    assert http == [("churn", "http", 1), ("churn", "http", 64), ("churn", "http-json", 64)]
    assert not skipped
    triton, _ = measurement_plan("triton", ["churn"], args)
    assert ("churn", "http", 64) in triton
    for label in ("echo", "naive", "mlserver", "batchline-nobatch"):
        others, _ = measurement_plan(label, ["churn"], args)
        assert all(not call.startswith("http") for _m, call, _c in others), label


@pytest.mark.parametrize(
    ("rate", "expected"),
    [
        (None, 4000),  # the warm-up failed: the run's window
        (20_000.0, 4000),  # 80,000 requests in 4 s: still the run's window
        (20_001.0, 3900),  # one more: whole 100 ms below 80,000 / rate
        (37_000.0, 2100),
        (500_000.0, 1000),  # never under a second
    ],
)
def test_a_window_holds_at_most_max_window_requests(rate: float | None, expected: int) -> None:
    from bench.field import MAX_WINDOW_REQUESTS, window_for

    assert MAX_WINDOW_REQUESTS == 80_000  # the table above is written for it
    assert window_for(rate, 4000) == expected


def test_a_row_measured_with_shorter_windows_says_so() -> None:
    from dataclasses import asdict

    from bench.field import markdown

    result = {
        "date": "2026-12-04",
        "machine": {
            "cpus": 2,
            "cpu_model": "x",
            "loadavg_before": "0",
            "python": "3.11",
            "onnxruntime": "1",
        },
        "method": {
            "server_cpus": "0",
            "client_cpus": "1",
            "window_ms": 4000,
            "max_trials": 6,
            "warmup_ms": 700,
        },
        "points": [
            asdict(point("echo-native", "-", "unary", 64, rps=37_000.0, window_ms=2100)),
            asdict(point("batchline", "churn", "unary", 64, rps=20_000.0)),
        ],
        "targets": [],
    }
    rows = {line.split(" | ")[0]: line for line in markdown(result).splitlines() if line.startswith("| echo-native") or line.startswith("| batchline")}  # fmt: skip
    assert rows["| echo-native"].endswith("| 2100 ms windows |")
    assert rows["| batchline"].endswith("|  |")
