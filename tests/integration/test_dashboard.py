"""The Grafana dashboard queries only metrics that a running server exports."""

from __future__ import annotations

import asyncio
import json
import re
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from server._proto import inference_pb2 as pb
from server._proto import inference_pb2_grpc as pb_grpc
from tests.support.apps import AppFactory
from tests.support.requests import infer_request

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "batchline.json"
METRIC = re.compile(r"batchline_[a-z_]+")
SUFFIXES = ("_bucket", "_sum", "_count", "_total", "_created")


def expressions(node: Any) -> Iterator[str]:
    """Every PromQL string in the dashboard: panel targets and variable queries, nested rows too."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("expr", "definition") and isinstance(value, str):
                yield value
            elif key == "query" and isinstance(value, str | dict):
                yield from (value,) if isinstance(value, str) else expressions(value)
            else:
                yield from expressions(value)
    elif isinstance(node, list):
        for item in node:
            yield from expressions(item)


def family_of(name: str, families: set[str]) -> str:
    """The metric family a sample name belongs to (`x_bucket` -> `x`, `x_total` -> `x`)."""
    if name in families:
        return name
    for suffix in SUFFIXES:
        if name.endswith(suffix) and name[: -len(suffix)] in families:
            return name[: -len(suffix)]
    return name


def test_dashboard_is_grafana_json_with_a_prometheus_datasource_variable() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "batchline"
    assert dashboard["schemaVersion"] >= 36
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
    for panel in panels:
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"], panel["title"]


async def test_every_metric_the_dashboard_queries_exists_on_a_running_server(
    start_app: AppFactory, tmp_path: Path
) -> None:
    app = await start_app(
        models=("churn@production",),
        server={"feature_store": f"sqlite:///{tmp_path}/f.db"},
    )
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        rows = np.random.default_rng(0).normal(size=(2, 15)).astype(np.float32)
        request = infer_request(rows, "churn")
        await asyncio.gather(*(stub.ModelInfer(request, timeout=10.0) for _ in range(8)))
        bad = pb.ModelInferRequest(model_name="churn")
        bad.inputs.add(name="nope", datatype="FP32", shape=[1, 15])
        bad.raw_input_contents.append(rows[:1].tobytes())
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await stub.ModelInfer(bad, timeout=10.0)
        assert failed.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    url = f"http://127.0.0.1:{app.metrics_port}/metrics"
    text = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=10).read().decode())
    exported = {family.name: family for family in text_string_to_metric_families(text)}

    queried: dict[str, set[str]] = {}
    for expr in expressions(json.loads(DASHBOARD.read_text())):
        for name in METRIC.findall(expr):
            queried.setdefault(family_of(name, set(exported)), set()).add(expr)
    assert len(queried) >= 20, sorted(queried)
    missing = {name: sorted(exprs)[0] for name, exprs in queried.items() if name not in exported}
    assert not missing, f"the dashboard queries metrics the server does not export: {missing}"

    # The requests above made labelled series, so the per-model panels have data to show.
    requests = exported["batchline_requests"]
    statuses = {s.labels["status"] for s in requests.samples if s.labels.get("model") == "churn"}
    assert {"OK", "INVALID_ARGUMENT"} <= statuses
    latency = exported["batchline_request_duration_seconds"]
    assert any(s.name.endswith("_bucket") and s.labels["model"] == "churn" for s in latency.samples)
    assert any(s.labels.get("model") == "churn" for s in exported["batchline_model_info"].samples)
