"""Locust load test for batchline: ModelInfer over gRPC (one channel per simulated user), or the
same scenarios over the V2 REST binding with locust's own HttpUser (LOCUST_PROTOCOL=http).

    locust -f loadtest/locustfile.py --host 127.0.0.1:8001                      # web UI
    locust -f loadtest/locustfile.py --host 127.0.0.1:8001 --headless -u 64 -r 16 -t 1m
    LOCUST_PROTOCOL=http locust -f loadtest/locustfile.py --host http://127.0.0.1:8000 \\
        --headless -u 64 -r 16 -t 1m

Every call is reported to locust's request event (request_type "grpc", a name per scenario,
response time in ms, response size in bytes, the exception when it failed), so locust's tables,
charts, CSV and JSON reports work as for HTTP. Scenarios (task weight in brackets):

- ``inline`` [8]: ``churn`` with the feature tensor in the request (LOCUST_ROWS rows, default 1).
- ``canary`` [2]: ``churn`` pinned to version LOCUST_CANARY_VERSION (default "2") for a share
  LOCUST_CANARY_SHARE (default 0.1) of calls, else LOCUST_PRIMARY_VERSION (default "1"); each
  version is its own row in the stats, and a reply from another version counts as a failure.
  The server must serve both versions.
- ``entity`` [4], only with LOCUST_ENTITY=1: entity-keyed requests, a BYTES input named
  LOCUST_ENTITY_KEY (default ``customer_id``) of shape [N] instead of features; the server
  looks the features up in its feature store. Ids come from LOCUST_ENTITY_IDS (a file: one id
  per line, or a CSV whose header names the entity key), else "0".."999". Off by default because
  it needs a server with a feature store holding those entities.

Over HTTP (``RestUser``) the scenario names read ``infer churn inline`` etc., tensors go as JSON
``data`` unless LOCUST_HTTP_BINARY=1 (Triton's binary tensor data both ways), and entity ids as
JSON strings. Other settings: LOCUST_MODEL (default ``churn``), LOCUST_TIMEOUT_S (per-call
deadline, default 10), LOCUST_WAIT_S (pause between a user's calls, default 0). Pick scenarios with locust's own
``--tags inline canary entity`` / ``--exclude-tags``. This module imports nothing from batchline
but the generated protocol (``server._proto``).
"""

from __future__ import annotations

import csv
import json
import os
import random
import struct
import time
from pathlib import Path
from typing import Any

import grpc
import grpc.experimental.gevent as grpc_gevent
import numpy as np
from locust import HttpUser, User, constant, tag, task
from locust.exception import StopUser

from server._proto import inference_pb2 as pb
from server._proto import inference_pb2_grpc as pb_grpc

# Let gRPC's blocking calls yield to gevent, so users run concurrently in one process.
grpc_gevent.init_gevent()

MODEL = os.environ.get("LOCUST_MODEL", "churn")
ROWS = int(os.environ.get("LOCUST_ROWS", "1"))
# Requests carry the parameter traffic=<this> so the server keeps them out of drift and shadow
# statistics; LOCUST_TRAFFIC="" sends them untagged (counted as live traffic).
TRAFFIC = os.environ.get("LOCUST_TRAFFIC", "loadtest")
TIMEOUT_S = float(os.environ.get("LOCUST_TIMEOUT_S", "10"))
WAIT_S = float(os.environ.get("LOCUST_WAIT_S", "0"))
PRIMARY_VERSION = os.environ.get("LOCUST_PRIMARY_VERSION", "1")
CANARY_VERSION = os.environ.get("LOCUST_CANARY_VERSION", "2")
CANARY_SHARE = float(os.environ.get("LOCUST_CANARY_SHARE", "0.1"))
ENTITY = os.environ.get("LOCUST_ENTITY", "") == "1"
ENTITY_KEY = os.environ.get("LOCUST_ENTITY_KEY", "customer_id")
ENTITY_IDS = os.environ.get("LOCUST_ENTITY_IDS", "")
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
PROTOCOL = os.environ.get("LOCUST_PROTOCOL", "grpc")
HTTP_BINARY = os.environ.get("LOCUST_HTTP_BINARY", "") == "1"
if PROTOCOL not in ("grpc", "http"):
    raise ValueError(f"LOCUST_PROTOCOL: expected grpc or http, got {PROTOCOL!r}")

_NUMPY = {"FP32": np.float32, "FP64": np.float64, "INT32": np.int32, "INT64": np.int64}


class ReplyMismatch(Exception):
    """The call succeeded but answered something else than asked (e.g. another version)."""


def _entity_ids() -> list[str]:
    if not ENTITY_IDS:
        return [str(i) for i in range(1000)]
    path = Path(ENTITY_IDS)
    lines = path.read_text().splitlines()
    if lines and ENTITY_KEY in next(csv.reader([lines[0]])):
        return [row[ENTITY_KEY] for row in csv.DictReader(lines) if row.get(ENTITY_KEY)]
    return [line.strip() for line in lines if line.strip()]


def _bytes_tensor(values: list[str]) -> bytes:
    """V2 raw BYTES: each element a 4-byte little-endian length, then its bytes."""
    out = bytearray()
    for value in values:
        data = value.encode()
        out += struct.pack("<I", len(data)) + data
    return bytes(out)


class InferenceUser(User):
    """One simulated client: its own gRPC channel, calling ModelInfer back to back."""

    abstract = PROTOCOL != "grpc"
    wait_time = constant(WAIT_S)

    def __init__(self, environment: Any) -> None:
        super().__init__(environment)
        if not self.host:
            raise ValueError("give the server as --host HOST:PORT (e.g. 127.0.0.1:8001)")
        target = self.host.removeprefix("grpc://").removeprefix("http://").rstrip("/")
        self._channel = grpc.insecure_channel(
            target,
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ],
        )
        self._stub = pb_grpc.GRPCInferenceServiceStub(self._channel)
        self._rng = np.random.default_rng(random.randrange(2**32))
        self._inputs: list[pb.ModelMetadataResponse.TensorMetadata] = []
        self._entity_ids = _entity_ids() if ENTITY else []

    def on_start(self) -> None:
        # The request's shape comes from the model's own metadata (input name, dtype, width).
        try:
            metadata = self._stub.ModelMetadata(
                pb.ModelMetadataRequest(name=MODEL), timeout=TIMEOUT_S
            )
        except grpc.RpcError as exc:
            self._fire("ModelMetadata", 0.0, 0, exc)
            raise StopUser() from exc
        self._inputs = list(metadata.inputs)

    def on_stop(self) -> None:
        self._channel.close()

    # ---- scenarios ---------------------------------------------------------------------------

    @tag("inline")
    @task(8)
    def inline(self) -> None:
        self._infer(f"ModelInfer {MODEL} inline", self._features_request())

    @tag("canary")
    @task(2)
    def canary(self) -> None:
        canary = self._rng.random() < CANARY_SHARE
        version = CANARY_VERSION if canary else PRIMARY_VERSION
        role = "canary" if canary else "primary"
        self._infer(
            f"ModelInfer {MODEL} v{version} ({role})",
            self._features_request(version),
            expect_version=version,
        )

    if ENTITY:

        @tag("entity")
        @task(4)
        def entity(self) -> None:
            ids = [random.choice(self._entity_ids) for _ in range(ROWS)]
            request = pb.ModelInferRequest(model_name=MODEL)
            request.inputs.add(name=ENTITY_KEY, datatype="BYTES", shape=[len(ids)])
            request.raw_input_contents.append(_bytes_tensor(ids))
            self._infer(f"ModelInfer {MODEL} entity", request)

    # ---- plumbing ----------------------------------------------------------------------------

    def _features_request(self, version: str = "") -> pb.ModelInferRequest:
        request = pb.ModelInferRequest(model_name=MODEL, model_version=version)
        for tensor in self._inputs:
            shape = [
                ROWS if i == 0 else (1 if d < 0 else int(d)) for i, d in enumerate(tensor.shape)
            ]
            dtype = _NUMPY.get(tensor.datatype)
            if dtype is None:
                raise StopUser(f"input {tensor.name}: {tensor.datatype} is not supported here")
            values = self._rng.random(int(np.prod(shape))).astype(dtype)
            request.inputs.add(name=tensor.name, datatype=tensor.datatype, shape=shape)
            request.raw_input_contents.append(values.tobytes())
        return request

    def _infer(self, name: str, request: pb.ModelInferRequest, expect_version: str = "") -> None:
        exception: Exception | None = None
        length = 0
        if TRAFFIC:
            request.parameters["traffic"].string_param = TRAFFIC
        start = time.perf_counter()
        try:
            reply = self._stub.ModelInfer(request, timeout=TIMEOUT_S)
            length = reply.ByteSize()
            if expect_version and reply.model_version != expect_version:
                exception = ReplyMismatch(
                    f"asked for version {expect_version}, got {reply.model_version!r}"
                )
        except grpc.RpcError as exc:
            exception = exc
        self._fire(name, (time.perf_counter() - start) * 1000, length, exception)

    def _fire(self, name: str, elapsed_ms: float, length: int, exception: Exception | None) -> None:
        if isinstance(exception, grpc.RpcError):
            # Locust groups failures by message: the status code and details read best.
            exception = RuntimeError(f"{exception.code().name}: {exception.details()}")
        self.environment.events.request.fire(
            request_type="grpc",
            name=name,
            response_time=elapsed_ms,
            response_length=length,
            exception=exception,
            context={},
        )


class RestUser(HttpUser):
    """The same scenarios over the V2 REST binding (LOCUST_PROTOCOL=http), one keep-alive
    connection per user; locust's HttpUser reports every request itself."""

    abstract = PROTOCOL != "http"
    wait_time = constant(WAIT_S)

    def __init__(self, environment: Any) -> None:
        super().__init__(environment)
        self._rng = np.random.default_rng(random.randrange(2**32))
        self._inputs: list[dict[str, Any]] = []
        self._entity_ids = _entity_ids() if ENTITY else []

    def on_start(self) -> None:
        with self.client.get(
            f"/v2/models/{MODEL}", name="metadata", timeout=TIMEOUT_S, catch_response=True
        ) as reply:
            if reply.status_code != 200:
                reply.failure(f"{reply.status_code}: {reply.text[:200]}")
                raise StopUser()
            self._inputs = reply.json()["inputs"]

    @tag("inline")
    @task(8)
    def inline(self) -> None:
        self._infer(f"infer {MODEL} inline", self._features())

    @tag("canary")
    @task(2)
    def canary(self) -> None:
        canary = self._rng.random() < CANARY_SHARE
        version = CANARY_VERSION if canary else PRIMARY_VERSION
        role = "canary" if canary else "primary"
        self._infer(f"infer {MODEL} v{version} ({role})", self._features(), version)

    if ENTITY:

        @tag("entity")
        @task(4)
        def entity(self) -> None:
            ids = [random.choice(self._entity_ids) for _ in range(ROWS)]
            tensor = {"name": ENTITY_KEY, "datatype": "BYTES", "shape": [len(ids)], "data": ids}
            self._infer(f"infer {MODEL} entity", [(tensor, None)])

    def _features(self) -> list[tuple[dict[str, Any], bytes | None]]:
        out: list[tuple[dict[str, Any], bytes | None]] = []
        for tensor in self._inputs:
            shape = [
                ROWS if i == 0 else (1 if d < 0 else int(d)) for i, d in enumerate(tensor["shape"])
            ]
            dtype = _NUMPY.get(tensor["datatype"])
            if dtype is None:
                raise StopUser(f"input {tensor['name']}: {tensor['datatype']} is not supported")
            values = self._rng.random(int(np.prod(shape))).astype(dtype)
            head: dict[str, Any] = {"name": tensor["name"], "datatype": tensor["datatype"],
                                    "shape": shape}  # fmt: skip
            if HTTP_BINARY:
                raw = values.tobytes()
                head["parameters"] = {"binary_data_size": len(raw)}
                out.append((head, raw))
            else:
                head["data"] = values.tolist()
                out.append((head, None))
        return out

    def _infer(
        self, name: str, tensors: list[tuple[dict[str, Any], bytes | None]], version: str = ""
    ) -> None:
        doc: dict[str, Any] = {"inputs": [t for t, _ in tensors]}
        parameters: dict[str, Any] = {"traffic": TRAFFIC} if TRAFFIC else {}
        if HTTP_BINARY:
            parameters["binary_data_output"] = True
        if parameters:
            doc["parameters"] = parameters
        header = json.dumps(doc).encode()
        blobs = [raw for _, raw in tensors if raw is not None]
        headers = {"Content-Type": "application/json"}
        if blobs:
            headers = {
                "Content-Type": "application/octet-stream",
                "Inference-Header-Content-Length": str(len(header)),
            }
        path = f"/v2/models/{MODEL}" + (f"/versions/{version}" if version else "") + "/infer"
        with self.client.post(
            path,
            data=b"".join([header, *blobs]),
            headers=headers,
            name=name,
            timeout=TIMEOUT_S,
            catch_response=True,
        ) as reply:
            if reply.status_code != 200:
                try:
                    message = reply.json()["error"]
                except (ValueError, KeyError, TypeError):
                    message = reply.text[:200]
                reply.failure(f"{reply.status_code}: {message}")
                return
            length = reply.headers.get("Inference-Header-Content-Length")
            body = reply.content[: int(length)] if length is not None else reply.content
            answered = json.loads(body).get("model_version")
            if version and answered != version:
                reply.failure(f"asked for version {version}, got {answered!r}")
