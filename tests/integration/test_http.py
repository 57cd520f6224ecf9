"""The V2 REST binding on a real server: tritonclient.http (sync and aio, JSON and binary tensor
data), raw requests as curl sends them (http.client over loopback), every error mapping, bodies
over max_message_bytes, slow clients timed out without stalling others, REST and gRPC requests
sharing one batch, TLS, admin auth and the metrics port.

Expected outputs come from onnxruntime run in this process on the same registry artifact.
Sync clients run in a thread (asyncio.to_thread) or against a `batchline serve` subprocess,
never blocking the loop the in-process server runs on.
"""

from __future__ import annotations

import asyncio
import gzip
import http.client
import json
import ssl
import struct
import subprocess
import urllib.error
import urllib.request
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.http as triton_http
import tritonclient.http.aio as triton_http_aio
from tritonclient.utils import InferenceServerException

from registry_client import FileRegistry
from registry_client.demo import entity_id, load_holdout
from server._proto import inference_pb2 as pb
from server._proto import inference_pb2_grpc as pb_grpc
from server.app import App, open_feature_store
from server.features.materialize import materialize, read_rows
from server.features.view import FeatureView
from tests.support.apps import AppFactory
from tests.support.metrics import scrape_async
from tests.support.models import registry_with_failing_churn, rows
from tests.support.polling import eventually
from tests.support.processes import ServerProcess
from tests.support.requests import binary_body, infer_json, infer_request

TIMEOUT = 30.0


@pytest.fixture(scope="module")
def session(demo_registry: Path) -> ort.InferenceSession:
    registry = FileRegistry(demo_registry)
    return ort.InferenceSession(
        str(registry.fetch(registry.get_version("churn", "1"))), providers=["CPUExecutionProvider"]
    )


@pytest.fixture(scope="module")
def features(demo_registry: Path) -> np.ndarray:
    return load_holdout(demo_registry, "churn", "1").X[:8].astype(np.float32)


def expected(session: ort.InferenceSession, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    labels, probabilities = session.run(["label", "probabilities"], {"input": x})
    return np.asarray(labels), np.asarray(probabilities)


class Reply:
    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    def json(self) -> Any:
        length = self.headers.get("inference-header-content-length")
        return json.loads(self.body[: int(length)] if length is not None else self.body)

    @property
    def error(self) -> str:
        message: str = self.json()["error"]
        return message


def _request(
    port: int,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    context: ssl.SSLContext | None = None,
) -> Reply:
    if context is None:
        conn: http.client.HTTPConnection = http.client.HTTPConnection(
            "127.0.0.1", port, timeout=TIMEOUT
        )
    else:
        conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=TIMEOUT, context=context)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        data = response.read()
        return Reply(response.status, {k.lower(): v for k, v in response.getheaders()}, data)
    finally:
        conn.close()


async def call(port: int, method: str, path: str, body: Any = None, **kw: Any) -> Reply:
    """One request as curl would send it (a fresh connection), from a thread."""
    if isinstance(body, dict):
        body = json.dumps(body).encode()
    return await asyncio.to_thread(_request, port, method, path, body, **kw)


def binary_outputs(reply: Reply) -> dict[str, np.ndarray]:
    """Decode a binary-data reply as Triton's client does: buffers in output order."""
    doc = reply.json()
    offset = int(reply.headers["inference-header-content-length"])
    out = {}
    dtypes = {"FP32": np.float32, "INT64": np.int64}
    for tensor in doc["outputs"]:
        size = tensor["parameters"]["binary_data_size"]
        blob = reply.body[offset : offset + size]
        offset += size
        out[tensor["name"]] = np.frombuffer(blob, dtypes[tensor["datatype"]]).reshape(
            tensor["shape"]
        )
    assert offset == len(reply.body)
    return out


# ---- tritonclient.http, unmodified, against `batchline serve` -------------------------------


@pytest.fixture(scope="module")
def client(server_process: ServerProcess) -> Iterator[triton_http.InferenceServerClient]:
    assert server_process.http_port > 0
    with triton_http.InferenceServerClient(url=f"127.0.0.1:{server_process.http_port}") as c:
        yield c


def test_tritonclient_http_sees_a_live_ready_server_and_its_models(
    client: triton_http.InferenceServerClient,
) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready("churn")
    assert not client.is_model_ready("no_such_model")
    meta = client.get_server_metadata()
    assert meta["name"] == "batchline"
    assert "binary_tensor_data" in meta["extensions"]
    model = client.get_model_metadata("churn")
    assert model["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 15]}]
    config = client.get_model_config("churn")
    assert config["max_batch_size"] == 64
    assert config["input"][0]["data_type"] == "TYPE_FP32"
    index = client.get_model_repository_index()
    assert {"name": "churn", "version": "1", "state": "READY"} in index


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_tritonclient_http_infer_matches_onnxruntime(
    client: triton_http.InferenceServerClient,
    session: ort.InferenceSession,
    features: np.ndarray,
    binary: bool,
) -> None:
    tensor = triton_http.InferInput("input", list(features.shape), "FP32")
    tensor.set_data_from_numpy(features, binary_data=binary)
    outputs = [
        triton_http.InferRequestedOutput("probabilities", binary_data=binary),
        triton_http.InferRequestedOutput("label", binary_data=binary),
    ]
    result = client.infer("churn", [tensor], outputs=outputs, request_id="r-1")
    labels, probabilities = expected(session, features)
    np.testing.assert_allclose(result.as_numpy("probabilities"), probabilities, rtol=1e-6)
    np.testing.assert_array_equal(result.as_numpy("label"), labels)
    response = result.get_response()
    assert response["id"] == "r-1"
    assert [o["name"] for o in response["outputs"]] == ["probabilities", "label"]


def test_tritonclient_http_without_outputs_gets_every_output_as_binary(
    client: triton_http.InferenceServerClient, session: ort.InferenceSession, features: np.ndarray
) -> None:
    tensor = triton_http.InferInput("input", list(features.shape), "FP32")
    tensor.set_data_from_numpy(features)
    result = client.infer("churn", [tensor], model_version="1")
    labels, probabilities = expected(session, features)
    np.testing.assert_allclose(result.as_numpy("probabilities"), probabilities, rtol=1e-6)
    np.testing.assert_array_equal(result.as_numpy("label"), labels)


def test_tritonclient_http_compressed_request_and_statistics(
    client: triton_http.InferenceServerClient, session: ort.InferenceSession, features: np.ndarray
) -> None:
    before = client.get_inference_statistics("churn")["model_stats"][0]
    for algorithm in ("gzip", "deflate"):
        tensor = triton_http.InferInput("input", list(features.shape), "FP32")
        tensor.set_data_from_numpy(features)
        result = client.infer("churn", [tensor], request_compression_algorithm=algorithm)
        np.testing.assert_allclose(
            result.as_numpy("probabilities"), expected(session, features)[1], rtol=1e-6
        )
    after = client.get_inference_statistics("churn")["model_stats"][0]
    assert (
        after["inference_stats"]["success"]["count"]
        >= before["inference_stats"]["success"]["count"] + 2
    )
    assert after["inference_count"] >= before["inference_count"] + 2 * len(features)


def test_tritonclient_http_compressed_responses(
    client: triton_http.InferenceServerClient, session: ort.InferenceSession, features: np.ndarray
) -> None:
    """tritonclient asks for a gzip or deflate reply (Accept-Encoding) and reads it, binary
    outputs included (Inference-Header-Content-Length counts the uncompressed header)."""
    for algorithm in ("gzip", "deflate"):
        for binary in (False, True):
            tensor = triton_http.InferInput("input", list(features.shape), "FP32")
            tensor.set_data_from_numpy(features)
            outputs = [triton_http.InferRequestedOutput("probabilities", binary_data=binary)]
            result = client.infer(
                "churn", [tensor], outputs=outputs, response_compression_algorithm=algorithm
            )
            np.testing.assert_allclose(
                result.as_numpy("probabilities"), expected(session, features)[1], rtol=1e-6
            )


def test_tritonclient_http_errors_carry_the_servers_message(
    client: triton_http.InferenceServerClient,
) -> None:
    tensor = triton_http.InferInput("input", [1, 14], "FP32")
    tensor.set_data_from_numpy(np.zeros((1, 14), np.float32))
    with pytest.raises(InferenceServerException) as err:
        client.infer("churn", [tensor])
    assert err.value.status() == "400"
    assert "dimension 1 must be 15" in err.value.message()
    with pytest.raises(InferenceServerException) as err:
        client.get_model_metadata("no_such_model")
    assert err.value.status() == "404"
    with pytest.raises(InferenceServerException) as err:
        client.unload_model("churn")
    assert err.value.status() == "400"
    assert "cannot be unloaded" in err.value.message()


async def test_tritonclient_http_aio_json_and_binary(
    server_process: ServerProcess, session: ort.InferenceSession, features: np.ndarray
) -> None:
    async with triton_http_aio.InferenceServerClient(
        url=f"127.0.0.1:{server_process.http_port}"
    ) as aio:
        assert await aio.is_server_ready()
        probabilities = expected(session, features)[1]
        for binary in (False, True):
            tensor = triton_http_aio.InferInput("input", list(features.shape), "FP32")
            tensor.set_data_from_numpy(features, binary_data=binary)
            outputs = [triton_http_aio.InferRequestedOutput("probabilities", binary_data=binary)]
            results = await asyncio.gather(
                *(aio.infer("churn", [tensor], outputs=outputs) for _ in range(8))
            )
            for result in results:
                np.testing.assert_allclose(
                    result.as_numpy("probabilities"), probabilities, rtol=1e-6
                )
                assert result.as_numpy("label") is None  # not asked for


# ---- curl-like requests: routes and payloads ----------------------------------------------


async def test_health_metadata_config_and_stats_routes(app: App) -> None:
    port = app.http_port
    live = await call(port, "GET", "/v2/health/live")
    assert (live.status, live.json()) == (200, {"live": True})
    ready = await call(port, "GET", "/v2/health/ready")
    assert (ready.status, ready.json()) == (200, {"ready": True})
    assert (await call(port, "GET", "/v2")).json()["name"] == "batchline"
    meta = (await call(port, "GET", "/v2/models/churn/versions/1")).json()
    assert meta["versions"] == ["1"]
    assert [o["name"] for o in meta["outputs"]] == ["label", "probabilities"]
    model_ready = await call(port, "GET", "/v2/models/churn/versions/1/ready")
    assert (model_ready.status, model_ready.json()) == (200, {"name": "churn", "ready": True})
    config = (await call(port, "GET", "/v2/models/churn/config")).json()
    assert config["input"][0]["dims"] == [15]
    assert config["parameters"]["version"] == {"string_value": "1"}
    all_stats = (await call(port, "GET", "/v2/models/stats")).json()
    assert {s["name"] for s in all_stats["model_stats"]} == {"churn", "churn_mlp"}
    one = (await call(port, "GET", "/v2/models/churn/stats")).json()["model_stats"]
    assert [s["name"] for s in one] == ["churn"]
    index = await call(port, "POST", "/v2/repository/index", b"{}")
    assert {"name": "churn_mlp", "version": "1", "state": "READY"} in index.json()


async def test_json_infer_takes_nested_or_flat_data_and_answers_json(
    app: App, session: ort.InferenceSession, features: np.ndarray
) -> None:
    labels, probabilities = expected(session, features)
    nested = await call(app.http_port, "POST", "/v2/models/churn/infer", infer_json(features))
    flat_request = infer_json(features, id="flat-1")
    flat_request["inputs"][0]["data"] = features.ravel().tolist()
    flat = await call(app.http_port, "POST", "/v2/models/churn/infer", flat_request)
    for reply in (nested, flat):
        assert reply.status == 200, reply.body
        assert reply.headers["content-type"] == "application/json"
        doc = reply.json()
        assert (doc["model_name"], doc["model_version"]) == ("churn", "1")
        by_name = {o["name"]: o for o in doc["outputs"]}
        assert by_name["probabilities"]["shape"] == [len(features), 2]
        np.testing.assert_allclose(
            np.array(by_name["probabilities"]["data"], np.float32).reshape(-1, 2),
            probabilities,
            rtol=1e-6,
        )
        assert by_name["label"]["data"] == labels.tolist()
    assert flat.json()["id"] == "flat-1"
    assert "id" not in nested.json()


async def test_binary_tensor_data_both_ways(
    app: App, session: ort.InferenceSession, features: np.ndarray
) -> None:
    labels, probabilities = expected(session, features)
    body, headers = binary_body(
        features, [{"name": "probabilities", "parameters": {"binary_data": True}}]
    )
    reply = await call(app.http_port, "POST", "/v2/models/churn/infer", body, headers=headers)
    assert reply.status == 200, reply.body
    assert reply.headers["content-type"] == "application/octet-stream"
    out = binary_outputs(reply)
    np.testing.assert_allclose(out["probabilities"], probabilities, rtol=1e-6)
    assert [o["name"] for o in reply.json()["outputs"]] == ["probabilities"]
    # binary_data_output: every output binary; a JSON request may ask for binary outputs too.
    request = infer_json(features, parameters={"binary_data_output": True})
    reply = await call(app.http_port, "POST", "/v2/models/churn/infer", request)
    out = binary_outputs(reply)
    np.testing.assert_array_equal(out["label"], labels)
    np.testing.assert_allclose(out["probabilities"], probabilities, rtol=1e-6)
    # Mixed: one output as JSON, one binary, in the order asked.
    request = infer_json(
        features,
        outputs=[{"name": "label"}, {"name": "probabilities", "parameters": {"binary_data": True}}],
    )
    reply = await call(app.http_port, "POST", "/v2/models/churn/infer", request)
    doc = reply.json()
    assert doc["outputs"][0]["data"] == labels.tolist()
    size = doc["outputs"][1]["parameters"]["binary_data_size"]
    assert size == probabilities.nbytes
    start = int(reply.headers["inference-header-content-length"])
    np.testing.assert_allclose(
        np.frombuffer(reply.body[start:], np.float32).reshape(-1, 2), probabilities, rtol=1e-6
    )


async def test_replies_are_compressed_as_accept_encoding_asks(app: App) -> None:
    x = rows(40, False)
    body = infer_json(x)
    plain = await call(app.http_port, "POST", "/v2/models/churn/infer", body)
    assert "content-encoding" not in plain.headers
    decode = {"gzip": gzip.decompress, "deflate": zlib.decompress}
    for accept, coding in [
        ("gzip", "gzip"),
        ("deflate", "deflate"),
        ("br, deflate;q=0.5, gzip;q=0.8", "gzip"),  # gzip first, as Triton's front prefers
        ("gzip;q=0, deflate", "deflate"),  # q=0: the client refuses gzip
    ]:
        reply = await call(
            app.http_port, "POST", "/v2/models/churn/infer", body,
            headers={"Accept-Encoding": accept},
        )  # fmt: skip
        assert reply.status == 200
        assert reply.headers["content-encoding"] == coding, accept
        assert reply.headers["vary"] == "accept-encoding"
        assert int(reply.headers["content-length"]) == len(reply.body) < len(plain.body)
        assert json.loads(decode[coding](reply.body)) == plain.json()
    for accept in ("identity", "br", "gzip;q=0"):
        reply = await call(
            app.http_port, "POST", "/v2/models/churn/infer", body,
            headers={"Accept-Encoding": accept},
        )  # fmt: skip
        assert "content-encoding" not in reply.headers, accept
        assert reply.json() == plain.json()
    # A reply too short to gain from it goes out as it is.
    live = await call(app.http_port, "GET", "/v2/health/live", headers={"Accept-Encoding": "gzip"})
    assert "content-encoding" not in live.headers
    assert live.json() == {"live": True}


async def test_gzip_body_and_chunked_upload(
    app: App, session: ort.InferenceSession, features: np.ndarray
) -> None:
    body = gzip.compress(json.dumps(infer_json(features)).encode())
    reply = await call(
        app.http_port, "POST", "/v2/models/churn/infer", body, headers={"Content-Encoding": "gzip"}
    )
    assert reply.status == 200, reply.body
    raw = json.dumps(infer_json(features)).encode()

    def chunked() -> Reply:
        conn = http.client.HTTPConnection("127.0.0.1", app.http_port, timeout=TIMEOUT)
        try:
            conn.request(
                "POST",
                "/v2/models/churn/infer",
                body=iter([raw[:100], raw[100:]]),
                encode_chunked=True,
            )
            response = conn.getresponse()
            return Reply(response.status, dict(response.getheaders()), response.read())
        finally:
            conn.close()

    reply = await asyncio.to_thread(chunked)
    assert reply.status == 200, reply.body
    np.testing.assert_allclose(
        np.array(reply.json()["outputs"][1]["data"], np.float32).reshape(-1, 2),
        expected(session, features)[1],
        rtol=1e-6,
    )


async def test_a_large_body_is_parsed_off_the_loop_and_answered(
    app: App, session: ort.InferenceSession
) -> None:
    """Over 256 KiB the body is inflated and parsed in a worker thread; the answer is the same."""
    x = np.random.default_rng(7).random((64, 15)).astype(np.float32)
    request = infer_json(x, parameters={"note": "x" * 400_000})
    body = json.dumps(request).encode()
    replies = await asyncio.gather(
        call(app.http_port, "POST", "/v2/models/churn/infer", body),
        call(
            app.http_port,
            "POST",
            "/v2/models/churn/infer",
            gzip.compress(body),
            headers={"Content-Encoding": "gzip"},
        ),
        call(app.http_port, "GET", "/v2/health/live"),
    )
    for reply in replies[:2]:
        assert reply.status == 200, reply.body[:200]
        np.testing.assert_allclose(
            np.array(reply.json()["outputs"][1]["data"], np.float32).reshape(-1, 2),
            expected(session, x)[1],
            rtol=1e-6,
        )
    assert replies[2].status == 200


# ---- errors: {"error": ...} with KServe's status mapping ------------------------------------


BAD_REQUESTS = [
    (b"{not json", "not valid JSON"),
    (b"[1, 2]", "request body: expected a JSON object"),
    (b"{}", "inputs: expected a non-empty array"),
    (
        json.dumps({"inputs": [{"name": "input", "datatype": "FP64", "shape": [1, 15],
                                "data": [0.5] * 15}]}).encode(),
        "has datatype FP64; model expects FP32",
    ),
    (
        json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 14],
                                "data": [0.5] * 14}]}).encode(),
        "dimension 1 must be 15",
    ),
    (
        json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 15],
                                "data": [0.5] * 3}]}).encode(),
        "data holds 3 values; shape [1, 15] needs 15",
    ),
    (
        json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 15],
                                "data": ["a"] * 15}]}).encode(),
        "data holds strings",
    ),
    (
        json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 15],
                                "data": [0.5] * 14 + [True]}]}).encode(),
        "input 'input' of datatype FP32: data holds true/false",
    ),
    (
        json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": "1,15",
                                "data": [0.5] * 15}]}).encode(),
        "inputs[0] ('input').shape: expected an array of integers",
    ),
    (
        json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 15],
                                "data": [0.5] * 15}]}).encode(),
        "unknown input 'x'",
    ),
    (
        json.dumps({**infer_json(np.zeros((1, 15), np.float32)),
                    "outputs": [{"name": "nope"}]}).encode(),
        "unknown output 'nope'",
    ),
    (
        json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 15],
                                "data": [[0.5] * 15, [0.5]]}]}).encode(),
        "not a regular array",
    ),
    (
        json.dumps({**infer_json(np.zeros((1, 15), np.float32)),
                    "parameters": {"drift": 3}}).encode(),
        "parameters.drift: expected a bool",
    ),
]  # fmt: skip


@pytest.mark.parametrize(("body", "message"), BAD_REQUESTS)
async def test_bad_input_answers_400_naming_the_field(app: App, body: bytes, message: str) -> None:
    reply = await call(app.http_port, "POST", "/v2/models/churn/infer", body)
    assert reply.status == 400, reply.body
    assert reply.headers["content-type"] == "application/json"
    assert message in reply.error


async def test_binary_data_sizes_are_checked_against_the_body_and_the_shape(app: App) -> None:
    x = np.zeros((1, 15), np.float32)
    body, headers = binary_body(x)
    path = "/v2/models/churn/infer"
    short = await call(app.http_port, "POST", path, body[:-4], headers=headers)
    assert short.status == 400
    assert "binary_data_size is 60 but only 56 bytes" in short.error
    extra = await call(app.http_port, "POST", path, body + b"\0\0\0\0", headers=headers)
    assert extra.status == 400
    assert "64 bytes of binary data" in extra.error
    header = json.loads(body[: int(headers["Inference-Header-Content-Length"])])
    header["inputs"][0]["parameters"]["binary_data_size"] = 56
    head = json.dumps(header).encode()
    wrong = await call(
        app.http_port,
        "POST",
        path,
        head + body[-56:],
        headers={"Inference-Header-Content-Length": str(len(head))},
    )
    assert wrong.status == 400
    assert "binary_data_size is 56 bytes; shape [1, 15] of FP32 needs 60" in wrong.error
    past = await call(
        app.http_port, "POST", path, body, headers={"Inference-Header-Content-Length": "99999"}
    )
    assert past.status == 400
    assert "Inference-Header-Content-Length is 99999" in past.error


async def test_routes_methods_and_models_that_do_not_exist(app: App) -> None:
    port = app.http_port
    cases = [
        ("GET", "/v2/models/nope", 404, "nope"),
        ("POST", "/v2/models/nope/infer", 404, "nope"),
        ("GET", "/v2/models/churn/versions/7", 404, "7"),
        ("GET", "/v2/models/nope/ready", 404, "nope"),
        ("GET", "/v1/models/churn", 404, "/v2"),
        ("GET", "/v2/models/churn/explain", 404, "no route"),
        ("GET", "/v2/models/churn/infer", 405, "use POST"),
        ("POST", "/v2/health/live", 405, "use GET"),
    ]
    for method, path, status, text in cases:
        reply = await call(port, method, path, b"{}" if method == "POST" else None)
        assert reply.status == status, (method, path, reply.body)
        assert text in reply.error, (method, path, reply.error)
    not_allowed = await call(port, "DELETE", "/v2/models/churn")
    assert not_allowed.headers["allow"] == "GET"


async def test_a_body_over_max_message_bytes_is_413_and_the_connection_closes(
    start_app: AppFactory,
) -> None:
    app = await start_app(models=("churn@production",), server={"max_message_bytes": 4096})
    big = json.dumps(infer_json(np.zeros((60, 15), np.float32))).encode()
    assert len(big) > 4096
    reply = await call(app.http_port, "POST", "/v2/models/churn/infer", big)
    assert reply.status == 413
    assert "limit is 4096 (max_message_bytes)" in reply.error
    assert reply.headers["connection"] == "close"
    # Chunked (no Content-Length): refused once the bytes read pass the limit.

    def chunked() -> int:
        conn = http.client.HTTPConnection("127.0.0.1", app.http_port, timeout=TIMEOUT)
        try:
            conn.request(
                "POST",
                "/v2/models/churn/infer",
                body=iter([big[i : i + 1000] for i in range(0, len(big), 1000)]),
                encode_chunked=True,
            )
            response = conn.getresponse()
            response.read()
            response.close()  # the socket's file too, or the socket stays open
            return response.status
        finally:
            conn.close()

    assert await asyncio.to_thread(chunked) == 413
    # A gzip bomb: small on the wire, over the limit once inflated.
    bomb = gzip.compress(b" " * 100_000)
    reply = await call(
        app.http_port, "POST", "/v2/models/churn/infer", bomb, headers={"Content-Encoding": "gzip"}
    )
    assert reply.status == 413
    assert "decompressed" in reply.error
    ok = await call(app.http_port, "POST", "/v2/models/churn/infer", infer_json(rows(1, False)))
    assert ok.status == 200


async def test_tensor_over_max_tensor_elements_is_413(start_app: AppFactory) -> None:
    app = await start_app(models=("churn@production",), server={"max_tensor_elements": 20})
    reply = await call(app.http_port, "POST", "/v2/models/churn/infer", infer_json(rows(2, False)))
    assert reply.status == 413
    assert "max_tensor_elements" in reply.error


HOLD = {"preferred_batch_sizes": (8,), "max_queue_delay_us": 3_000_000}


async def test_shed_requests_get_429(start_app: AppFactory) -> None:
    # A lone 1-row request waits for the preferred batch of 8, so it stays in flight.
    app = await start_app(models=("churn@production",), max_in_flight=1, **HOLD)
    held = asyncio.create_task(
        call(app.http_port, "POST", "/v2/models/churn/infer", infer_json(rows(1, False)))
    )
    served = app.models.get("churn")
    await eventually(lambda: served.in_flight >= 1, timeout=TIMEOUT, what="the first request")
    shed = await call(app.http_port, "POST", "/v2/models/churn/infer", infer_json(rows(1, False)))
    assert shed.status == 429
    assert "max_in_flight 1" in shed.error
    assert (await held).status == 200


async def test_draining_answers_503_and_the_accepted_request_still_completes(
    start_app: AppFactory,
) -> None:
    app = await start_app(models=("churn@production",), grace_period_s=20.0, **HOLD)
    held = asyncio.create_task(
        call(app.http_port, "POST", "/v2/models/churn/infer", infer_json(rows(1, False)))
    )
    served = app.models.get("churn")
    await eventually(lambda: served.in_flight >= 1, timeout=TIMEOUT, what="the first request")
    stopping = asyncio.create_task(app.stop())
    # stop() turns readiness off before its first await
    await eventually(lambda: not app.ready, timeout=TIMEOUT, what="readiness off")
    assert not app.ready
    ready = await call(app.http_port, "GET", "/v2/health/ready")
    assert (ready.status, ready.json()) == (503, {"ready": False})
    late = await call(app.http_port, "POST", "/v2/models/churn/infer", infer_json(rows(1, False)))
    assert late.status == 503
    assert "shutting down" in late.error
    assert late.headers["connection"] == "close"
    model_ready = await call(app.http_port, "GET", "/v2/models/churn/ready")
    assert model_ready.status == 503
    first = await held
    assert first.status == 200, first.body
    await stopping


async def test_a_failing_model_answers_500(
    start_app: AppFactory, demo_registry: Path, tmp_path: Path
) -> None:
    registry, failing = registry_with_failing_churn(demo_registry, tmp_path)
    app = await start_app(models=("churn@production",), registry=registry)
    path = f"/v2/models/churn/versions/{failing}/infer"
    reply = await call(app.http_port, "POST", path, infer_json(rows(1, True)))
    assert reply.status == 500
    assert reply.error
    good = await call(app.http_port, "POST", path, infer_json(rows(1, False)))
    assert good.status == 200


# ---- slow clients ---------------------------------------------------------------------------


async def test_a_client_that_never_finishes_its_body_is_timed_out_without_stalling_others(
    start_app: AppFactory,
) -> None:
    app = await start_app(models=("churn@production",), server={"http_request_timeout_s": 1.0})
    body = json.dumps(infer_json(rows(1, False))).encode()
    slow_r, slow_w = await asyncio.open_connection("127.0.0.1", app.http_port)
    slow_w.write(
        b"POST /v2/models/churn/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n" % len(body) + body[:20]
    )
    await slow_w.drain()
    silent_r, silent_w = await asyncio.open_connection("127.0.0.1", app.http_port)
    half_r, half_w = await asyncio.open_connection("127.0.0.1", app.http_port)
    half_w.write(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n")  # headers never end
    await half_w.drain()
    # Meanwhile everyone else is served as usual.
    for _ in range(5):
        ok = await call(app.http_port, "POST", "/v2/models/churn/infer", body)
        assert ok.status == 200
    for reader in (slow_r, silent_r, half_r):
        answer = await asyncio.wait_for(reader.read(), TIMEOUT)  # until the server closes
        assert answer.startswith(b"HTTP/1.1 408 "), answer
        assert b"http_request_timeout_s" in answer
    for writer in (slow_w, silent_w, half_w):
        writer.close()
    assert (await call(app.http_port, "GET", "/v2/health/live")).status == 200


# ---- one pipeline for both protocols ------------------------------------------------------


async def test_http_and_grpc_requests_share_one_batch(start_app: AppFactory) -> None:
    """3 rows over gRPC and 5 over HTTP wait for the preferred batch of 8: the statistics show
    exactly one execution of 8 rows, which only the two together could fill."""
    app = await start_app(models=("churn@production",), **HOLD)
    request = infer_request(rows(3, False), "churn")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        grpc_reply, http_reply = await asyncio.gather(
            stub.ModelInfer(request, timeout=TIMEOUT),
            call(app.http_port, "POST", "/v2/models/churn/infer", infer_json(rows(5, False))),
        )
    assert list(grpc_reply.outputs[1].shape) == [3, 2]
    assert http_reply.json()["outputs"][1]["shape"] == [5, 2]
    stats = (await call(app.http_port, "GET", "/v2/models/churn/stats")).json()["model_stats"][0]
    assert stats["execution_count"] == 1
    assert stats["inference_count"] == 8
    assert [b["batch_size"] for b in stats["batch_stats"]] == [8]
    assert stats["inference_stats"]["success"]["count"] == 2
    samples = await scrape_async(app.metrics_port)
    ok = {
        dict(labels)["protocol"]: value
        for (name, labels), value in samples.items()
        if name == "batchline_requests_total" and dict(labels)["status"] == "OK"
    }
    assert ok == {"grpc": 1.0, "http": 1.0}


async def test_rest_requests_started_under_the_turn_budget_join_the_grpc_calls_batch(
    start_app: AppFactory,
) -> None:
    """Four 1-row gRPC calls are held in flight (waiting for the preferred batch of 8), so REST
    starts one request per loop turn; four 1-row REST requests still fill that one batch. (The
    budget is the grpcio transport's: the native one needs none.)"""
    app = await start_app(models=("churn@production",), server={"grpc_transport": "grpcio"}, **HOLD)
    request = pb.ModelInferRequest(model_name="churn")
    request.inputs.add(name="input", datatype="FP32", shape=[1, 15])
    request.raw_input_contents.append(rows(1, False).tobytes())
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        grpc_calls = [
            asyncio.ensure_future(stub.ModelInfer(request, timeout=TIMEOUT)) for _ in range(4)
        ]
        await eventually(
            lambda: app.pipeline.in_flight == 4, timeout=TIMEOUT, what="4 gRPC calls held"
        )
        assert app._server.calls_in_flight() >= 1  # the budget is in force
        http_replies = await asyncio.gather(
            *(
                call(app.http_port, "POST", "/v2/models/churn/infer", infer_json(rows(1, False)))
                for _ in range(4)
            )
        )
        grpc_replies = await asyncio.gather(*grpc_calls)
    assert [r.status for r in http_replies] == [200] * 4
    assert all(list(r.outputs[1].shape) == [1, 2] for r in grpc_replies)
    stats = (await call(app.http_port, "GET", "/v2/models/churn/stats")).json()["model_stats"][0]
    assert [b["batch_size"] for b in stats["batch_stats"]] == [8]
    assert stats["execution_count"] == 1


async def test_entity_ids_as_json_strings_answer_like_grpc(
    start_app: AppFactory, demo_registry: Path, tmp_path: Path
) -> None:
    store = FileRegistry(demo_registry)
    mv = store.resolve("churn@production")
    view = FeatureView.from_json(
        store.attachment(mv.name, mv.version, "feature_view.json").read_text()
    )
    url = f"sqlite:///{tmp_path / 'features.db'}"
    feature_store = open_feature_store(url)
    try:
        await materialize(
            view, read_rows(store.attachment(mv.name, mv.version, "entities.csv")), feature_store
        )
    finally:
        await feature_store.close()
    app = await start_app(models=("churn@production",), server={"feature_store": url})
    ids = [entity_id(i) for i in (0, 3, 5)]
    reply = await call(
        app.http_port,
        "POST",
        "/v2/models/churn/infer",
        {"inputs": [{"name": view.entity_key, "datatype": "BYTES", "shape": [3], "data": ids}]},
    )
    assert reply.status == 200, reply.body
    request = pb.ModelInferRequest(model_name="churn")
    request.inputs.add(name=view.entity_key, datatype="BYTES", shape=[3])
    request.raw_input_contents.append(b"".join(struct.pack("<I", len(i)) + i.encode() for i in ids))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as channel:
        by_grpc = await pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
            request, timeout=TIMEOUT
        )
    grpc_probabilities = np.frombuffer(by_grpc.raw_output_contents[1], np.float32).reshape(-1, 2)
    http_probabilities = np.array(reply.json()["outputs"][1]["data"], np.float32).reshape(-1, 2)
    np.testing.assert_array_equal(http_probabilities, grpc_probabilities)
    numbers = await call(
        app.http_port,
        "POST",
        "/v2/models/churn/infer",
        {"inputs": [{"name": view.entity_key, "datatype": "BYTES", "shape": [1], "data": [7]}]},
    )
    assert numbers.status == 400
    assert "BYTES elements are JSON strings" in numbers.error


# ---- admin, TLS, metrics port ---------------------------------------------------------------


async def test_repository_load_and_unload_follow_the_admin_guard(start_app: AppFactory) -> None:
    app = await start_app(models=("churn@production",), server={"admin_token": "s3cret"})
    path = "/v2/repository/models/churn/load"
    missing = await call(app.http_port, "POST", path, b"{}")
    assert missing.status == 401
    assert "Authorization: Bearer" in missing.error
    wrong = await call(app.http_port, "POST", path, b"{}", headers={"Authorization": "Bearer nope"})
    assert wrong.status == 401
    right = await call(
        app.http_port, "POST", path, b"{}", headers={"Authorization": "Bearer s3cret"}
    )
    assert right.status == 200, right.body
    unload = await call(
        app.http_port,
        "POST",
        "/v2/repository/models/churn/unload",
        b"{}",
        headers={"Authorization": "Bearer s3cret"},
    )
    assert unload.status == 400
    # Inference never needs the token.
    assert (
        await call(app.http_port, "POST", "/v2/models/churn/infer", infer_json(rows(1, False)))
    ).status == 200


async def test_admin_is_closed_on_a_public_host_without_a_token(start_app: AppFactory) -> None:
    app = await start_app(models=("churn@production",), server={"host": "0.0.0.0"})
    reply = await call(app.http_port, "POST", "/v2/repository/models/churn/load", b"{}")
    assert reply.status == 403
    assert "admin_token_file" in reply.error


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


async def test_https_with_the_grpc_certificates_and_mutual_tls(
    start_app: AppFactory, tmp_path: Path
) -> None:
    d = tmp_path
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out",
             "ca.pem", "-days", "2", "-subj", "/CN=batchline test CA", cwd=d)  # fmt: skip
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for name in ("server", "client"):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out",
                 f"{name}.csr", "-subj", f"/CN={name}", cwd=d)  # fmt: skip
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                 "-CAcreateserial", "-out", f"{name}.pem", "-days", "2", "-extfile", "san.ext",
                 cwd=d)  # fmt: skip
    app = await start_app(
        models=("churn@production",),
        server={
            "tls_cert": str(d / "server.pem"),
            "tls_key": str(d / "server.key"),
            "tls_ca": str(d / "ca.pem"),
        },
    )
    with_cert = ssl.create_default_context(cafile=str(d / "ca.pem"))
    with_cert.load_cert_chain(str(d / "client.pem"), str(d / "client.key"))
    reply = await call(
        app.http_port, "POST", "/v2/models/churn/infer", infer_json(rows(1, False)),
        context=with_cert,
    )  # fmt: skip
    assert reply.status == 200
    without_cert = ssl.create_default_context(cafile=str(d / "ca.pem"))
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        await call(app.http_port, "GET", "/v2/health/ready", context=without_cert)
    with pytest.raises((http.client.HTTPException, ConnectionError, OSError)):
        await call(app.http_port, "GET", "/v2/health/ready")  # plaintext


async def test_metrics_port_answers_404_off_metrics(app: App) -> None:
    base = f"http://127.0.0.1:{app.metrics_port}"
    for path in ("/", "/v2/health/ready", "/v2/models/churn"):
        with pytest.raises(urllib.error.HTTPError) as err:
            await asyncio.to_thread(urllib.request.urlopen, base + path, timeout=TIMEOUT)
        assert err.value.code == 404
        err.value.close()  # the error holds the response (and its socket) open
    text = await asyncio.to_thread(
        lambda: urllib.request.urlopen(base + "/metrics", timeout=TIMEOUT).read().decode()
    )
    assert "batchline_requests_total" in text


async def test_http_port_minus_one_turns_rest_off(start_app: AppFactory) -> None:
    app = await start_app(models=("churn@production",), server={"http_port": -1})
    assert app.http_port == 0
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as channel:
        reply = await pb_grpc.GRPCInferenceServiceStub(channel).ServerReady(
            pb.ServerReadyRequest(), timeout=TIMEOUT
        )
    assert reply.ready
