"""Traces from a real server: the request span continues the caller's traceparent, its children
carry the stages, and the batch span links to every request it served."""

from __future__ import annotations

from pathlib import Path

import grpc
import numpy as np

from server._proto import inference_pb2_grpc as pb_grpc
from tests.support.apps import AppFactory
from tests.support.requests import infer_request

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"


async def test_a_traced_request_continues_the_callers_trace_through_queue_and_batch(
    start_app: AppFactory, tmp_path: Path
) -> None:
    config = tmp_path / "batchline.toml"
    config.write_text('[tracing]\nsampling_ratio = 1.0\nexporter = "memory"\n')
    app = await start_app(models=("churn@production",), config=str(config))
    request = infer_request(np.zeros((1, 15), np.float32), "churn", id="traced")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        metadata = (("traceparent", f"00-{TRACE_ID}-{PARENT_ID}-01"),)
        await stub.ModelInfer(request, metadata=metadata, timeout=10)
    spans = app.tracing.exporter.get_finished_spans()  # type: ignore[union-attr]
    by_name = {s.name: s for s in spans}
    root = by_name["ModelInfer"]
    assert f"{root.context.trace_id:032x}" == TRACE_ID
    assert root.parent is not None
    assert f"{root.parent.span_id:016x}" == PARENT_ID
    for child in ("queue_wait", "encode"):
        assert by_name[child].parent is not None
        assert by_name[child].parent.span_id == root.context.span_id
        assert by_name[child].context.trace_id == root.context.trace_id
    batches = [s for s in spans if s.name not in ("ModelInfer", "queue_wait", "encode")]
    assert len(batches) == 1
    assert [link.context.span_id for link in batches[0].links] == [root.context.span_id]
    assert root.attributes is not None
    assert root.attributes["batchline.request_id"] == "traced"
