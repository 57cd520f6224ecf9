"""Requests for the test models (churn, churn_mlp: one FP32 `input` [N, 15]; churn's entity
key `customer_id`), as V2 gRPC messages and as REST bodies, and their replies decoded."""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from server._proto import inference_pb2 as pb

DTYPES = {"FP32": np.float32, "INT64": np.int64}


def infer_request(
    x: np.ndarray, model: str = "churn", *, id: str = "", version: str = ""
) -> pb.ModelInferRequest:
    """`x` as churn's `input` tensor in raw_input_contents (as tritonclient sends it)."""
    request = pb.ModelInferRequest(model_name=model, model_version=version, id=id)
    request.inputs.add(name="input", datatype="FP32", shape=list(x.shape))
    request.raw_input_contents.append(np.ascontiguousarray(x, dtype=np.float32).tobytes())
    return request


def typed_request(x: np.ndarray, model: str = "churn", *, id: str = "") -> pb.ModelInferRequest:
    """`x` as the `input` tensor in typed contents (fp32_contents)."""
    request = pb.ModelInferRequest(model_name=model, id=id)
    tensor = request.inputs.add(name="input", datatype="FP32", shape=list(x.shape))
    tensor.contents.fp32_contents.extend(np.asarray(x, dtype=np.float32).ravel().tolist())
    return request


def entity_request(ids: list[str], model: str = "churn", *, id: str = "") -> pb.ModelInferRequest:
    """Entity ids as the BYTES `customer_id` tensor: the server looks the features up."""
    request = pb.ModelInferRequest(model_name=model, id=id)
    tensor = request.inputs.add(name="customer_id", datatype="BYTES", shape=[len(ids)])
    tensor.contents.bytes_contents.extend(i.encode() for i in ids)
    return request


def outputs_of(reply: pb.ModelInferResponse) -> dict[str, np.ndarray]:
    """Each raw output by name, shaped as the reply says."""
    return {
        out.name: np.frombuffer(raw, dtype=DTYPES[out.datatype]).reshape(tuple(out.shape))
        for out, raw in zip(reply.outputs, reply.raw_output_contents, strict=True)
    }


def probabilities(reply: pb.ModelInferResponse) -> np.ndarray:
    """The `probabilities` output [N, 2], raw or typed."""
    i = [o.name for o in reply.outputs].index("probabilities")
    if reply.raw_output_contents:
        data = np.frombuffer(reply.raw_output_contents[i], dtype=np.float32)
    else:
        data = np.asarray(reply.outputs[i].contents.fp32_contents, dtype=np.float32)
    return data.reshape(-1, 2)


# ---- REST (the V2 HTTP binding) ----------------------------------------------------------------


def infer_json(x: np.ndarray, **extra: Any) -> dict[str, Any]:
    """A JSON inference body with `x` as the `input` tensor; `extra` keys added at the top."""
    return {
        "inputs": [
            {"name": "input", "datatype": "FP32", "shape": list(x.shape), "data": x.tolist()}
        ],
        **extra,
    }


def binary_body(
    x: np.ndarray, outputs: list[dict[str, Any]] | None = None
) -> tuple[bytes, dict[str, str]]:
    """Triton's binary tensor data extension: the JSON header, then `x`'s bytes; the body and
    the headers that say where the JSON ends."""
    raw = np.ascontiguousarray(x, dtype=np.float32).tobytes()
    head: dict[str, Any] = {
        "inputs": [
            {
                "name": "input",
                "datatype": "FP32",
                "shape": list(x.shape),
                "parameters": {"binary_data_size": len(raw)},
            }
        ]
    }
    if outputs is not None:
        head["outputs"] = outputs
    header = json.dumps(head).encode()
    return header + raw, {
        "Inference-Header-Content-Length": str(len(header)),
        "Content-Type": "application/octet-stream",
    }
