"""One data plane behind both bindings: what gRPC and REST say about the server and its models
is the same document (the REST JSON parsed into the gRPC message equals the gRPC reply), and
the admin service reads status through the plane's snapshots."""

from __future__ import annotations

import asyncio
import http.client
import json
from typing import Any

import grpc
import numpy as np
import pytest
from google.protobuf.json_format import ParseDict

from server._proto import admin_pb2 as admin_pb
from server._proto import admin_pb2_grpc as admin_grpc
from server._proto import inference_pb2 as pb
from server._proto import inference_pb2_grpc as pb_grpc
from server.app import App
from tests.support.requests import infer_request


def _get(port: int, method: str, path: str) -> Any:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request(method, path, body=b"{}" if method == "POST" else None)
        response = conn.getresponse()
        assert response.status == 200, response.read()
        return json.loads(response.read())
    finally:
        conn.close()


async def rest(app: App, method: str, path: str) -> Any:
    return await asyncio.to_thread(_get, app.http_port, method, path)


def _request(model: str) -> Any:
    return infer_request(np.ones((2, 15), np.float32), model, id="parity")


async def test_grpc_and_rest_answer_the_same_metadata_config_statistics_and_index(
    app: App,
) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        for _ in range(3):
            await stub.ModelInfer(_request("churn"), timeout=30)
        pairs = [
            (
                await stub.ServerMetadata(pb.ServerMetadataRequest(), timeout=30),
                await rest(app, "GET", "/v2"),
            ),
            (
                await stub.ModelMetadata(pb.ModelMetadataRequest(name="churn"), timeout=30),
                await rest(app, "GET", "/v2/models/churn"),
            ),
            (
                await stub.ModelConfig(pb.ModelConfigRequest(name="churn_mlp"), timeout=30),
                {"config": await rest(app, "GET", "/v2/models/churn_mlp/config")},
            ),
            (
                await stub.ModelStatistics(pb.ModelStatisticsRequest(name="churn"), timeout=30),
                await rest(app, "GET", "/v2/models/churn/stats"),
            ),
            (
                await stub.ModelStatistics(pb.ModelStatisticsRequest(), timeout=30),
                await rest(app, "GET", "/v2/models/stats"),
            ),
            (
                await stub.RepositoryIndex(pb.RepositoryIndexRequest(), timeout=30),
                {"models": await rest(app, "POST", "/v2/repository/index")},
            ),
        ]
    for grpc_reply, rest_json in pairs:
        assert ParseDict(rest_json, type(grpc_reply)()) == grpc_reply, type(grpc_reply).__name__
    # The statistics are live, not a fixture: the three requests are in them.
    (churn,) = pairs[3][0].model_stats
    assert churn.inference_stats.success.count == 3


async def test_admin_model_status_is_the_managers_snapshot_and_names_unknown_models(
    app: App,
) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as channel:
        admin = admin_grpc.AdminServiceStub(channel)
        await admin.ReloadModel(admin_pb.ReloadModelRequest(model="churn"), timeout=30)
        (state,) = (
            await admin.ModelStatus(admin_pb.ModelStatusRequest(model="churn"), timeout=30)
        ).models
        with pytest.raises(grpc.aio.AioRpcError) as unknown:
            await admin.ModelStatus(admin_pb.ModelStatusRequest(model="nope"), timeout=30)
    (status,) = app.models.status("churn")
    assert (state.name, state.version, state.ref, state.state) == (
        "churn",
        status.version,
        status.ref,
        "READY",
    )
    assert state.execution in ("inline", "executor")
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
    assert "unknown model 'nope'" in (unknown.value.details() or "")
