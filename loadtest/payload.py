"""The request a run sends, serialised once: from JSON, a binary file, or a model's metadata."""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from google.protobuf import json_format
from google.protobuf.message import DecodeError, Message

from loadtest.options import Options
from server._proto import inference_pb2 as pb

SERVICE = "inference.GRPCInferenceService"
STREAM_INFER = "ModelStreamInfer"
REQUEST_ID = "loadtest"

_NUMPY_DTYPES: dict[str, type[np.generic]] = {
    "BOOL": np.bool_,
    "UINT8": np.uint8,
    "UINT16": np.uint16,
    "UINT32": np.uint32,
    "UINT64": np.uint64,
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
    "FP16": np.float16,
    "FP32": np.float32,
    "FP64": np.float64,
}
# V2 typed contents: which InferTensorContents field carries each datatype.
_CONTENTS_FIELD = {
    "BOOL": "bool_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}


@dataclass(frozen=True)
class Method:
    """A method of the V2 service, resolved from ghz's ``--call`` spelling."""

    name: str
    path: str
    streaming: bool
    request_type: type[Message]


def resolve_call(call: str) -> Method:
    """Accept ``inference.GRPCInferenceService/ModelInfer`` or ``...GRPCInferenceService.ModelInfer``."""
    text = call.strip().lstrip("/")
    service, sep, name = text.rpartition("/")
    if not sep:
        service, _, name = text.rpartition(".")
    if service != SERVICE:
        raise ValueError(f"--call: only {SERVICE} methods are supported, got {call!r}")
    methods = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods_by_name
    method = methods.get(name)
    if method is None:
        raise ValueError(f"--call: {SERVICE} has no method {name!r}")
    if method.client_streaming != method.server_streaming:
        raise ValueError(f"--call: {name} is half-streaming; unary or bidirectional only")
    if method.client_streaming and name != STREAM_INFER:
        raise ValueError(f"--call: only {STREAM_INFER} is supported among streaming methods")
    return Method(
        name=name,
        path=f"/{SERVICE}/{name}",
        streaming=method.client_streaming,
        request_type=getattr(pb, method.input_type.name),
    )


def static_request(options: Options, method: Method) -> bytes | None:
    """The serialised request from the options, or None when it must come from ModelMetadata."""
    if options.model is not None:
        if method.request_type is not pb.ModelInferRequest:
            raise ValueError(f"--model builds a ModelInferRequest; {method.name} takes another")
        return None
    if options.request is not None:
        return _checked(options.request, method, "request")
    if options.binary_file is not None:
        return _checked(options.binary_file.read_bytes(), method, "-b/--binary-file")
    if options.data_file is not None:
        return _from_json(options.data_file.read_text(), method, "-D/--data-file")
    if options.data is not None:
        return _from_json(options.data, method, "-d/--data")
    return method.request_type().SerializeToString()


def _checked(raw: bytes, method: Method, flag: str) -> bytes:
    try:
        method.request_type.FromString(raw)
    except DecodeError as e:
        raise ValueError(f"{flag}: not a serialised {method.request_type.__name__}: {e}") from e
    return raw


def _from_json(data: str | Mapping[str, Any], method: Method, flag: str) -> bytes:
    try:
        obj = json.loads(data) if isinstance(data, str) else data
        message = json_format.ParseDict(obj, method.request_type())
    except (json.JSONDecodeError, json_format.ParseError) as e:
        raise ValueError(f"{flag}: not a {method.request_type.__name__} in JSON: {e}") from e
    return message.SerializeToString()


def infer_request_for_model(
    metadata: pb.ModelMetadataResponse,
    *,
    rows: int,
    version: str = "",
    typed: bool = False,
    seed: int = 0,
    traffic: str = "loadtest",
) -> pb.ModelInferRequest:
    """A request filling every input of ``metadata`` with random values of its datatype.

    Tagged ``traffic: <traffic>`` (a request parameter) so the server keeps synthetic load out of
    drift and shadow statistics; ``traffic=""`` sends it untagged (counted as live).

    A dynamic first dimension becomes ``rows``; other dynamic dimensions become 1. Values go in
    ``raw_input_contents`` (the fast path) unless ``typed``. BYTES elements are ``b"1"``.
    """
    rng = np.random.default_rng(seed)
    request = pb.ModelInferRequest(model_name=metadata.name, model_version=version, id=REQUEST_ID)
    if traffic:
        request.parameters["traffic"].string_param = traffic
    for tensor in metadata.inputs:
        shape = [
            rows if (i == 0 and d < 0) else (1 if d < 0 else int(d))
            for i, d in enumerate(tensor.shape)
        ]
        inp = request.inputs.add(name=tensor.name, datatype=tensor.datatype, shape=shape)
        n = int(np.prod(shape)) if shape else 1
        if tensor.datatype == "BYTES":
            if typed:
                inp.contents.bytes_contents.extend([b"1"] * n)
            else:
                # Raw BYTES: each element is a 4-byte little-endian length, then the bytes.
                request.raw_input_contents.append((struct.pack("<I", 1) + b"1") * n)
            continue
        dtype = _NUMPY_DTYPES.get(tensor.datatype)
        if dtype is None:
            raise ValueError(
                f"--model: input {tensor.name!r} has unsupported datatype {tensor.datatype}"
            )
        values = _random(rng, dtype, n)
        if typed:
            field = _CONTENTS_FIELD.get(tensor.datatype)
            if field is None:
                raise ValueError(
                    f"--typed: {tensor.datatype} has no typed contents field; omit --typed"
                )
            getattr(inp.contents, field).extend(values.tolist())
        else:
            request.raw_input_contents.append(values.tobytes())
    return request


def _random(rng: np.random.Generator, dtype: type[np.generic], n: int) -> np.ndarray[Any, Any]:
    if dtype is np.bool_:
        return rng.integers(0, 2, n).astype(np.bool_)
    if np.issubdtype(dtype, np.floating):
        return rng.random(n).astype(dtype)
    return rng.integers(0, 10, n).astype(dtype)
