"""The request a run sends, serialised once: from JSON, a binary file, or a model's metadata."""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from google.protobuf import json_format
from google.protobuf.message import DecodeError, Message

from loadtest.options import Options
from registry_client.datatypes import TYPED_FIELD, V2_TO_NUMPY
from server._proto import inference_pb2 as pb

SERVICE = "inference.GRPCInferenceService"
STREAM_INFER = "ModelStreamInfer"
REQUEST_ID = "loadtest"

# From the project's one datatype table (BYTES is built separately, as length-prefixed raw).
_NUMPY_DTYPES: dict[str, type[np.generic]] = {
    name: dtype.type for name, dtype in V2_TO_NUMPY.items() if name != "BYTES"
}
# V2 typed contents: which InferTensorContents field carries each datatype.
_CONTENTS_FIELD = TYPED_FIELD


@dataclass(frozen=True)
class Method:
    """A method of the V2 service, resolved from ghz's ``--call`` spelling."""

    name: str
    path: str
    streaming: bool
    request_type: type[Message]


def resolve_call(call: str, options: Options | None = None) -> Method:
    """Accept ``inference.GRPCInferenceService/ModelInfer``, ``...GRPCInferenceService.ModelInfer``
    or the method alone (``ModelInfer``); with ``--proto``/``--protoset`` in ``options``, any
    service those files define."""
    if options is not None and (options.proto is not None or options.protoset is not None):
        return _resolve_in(call, *load_descriptors(options))
    text = call.strip().lstrip("/")
    service, sep, name = text.rpartition("/")
    if not sep:
        service, _, name = text.rpartition(".")
    if service in ("", "GRPCInferenceService"):
        service = SERVICE
    if service != SERVICE:
        raise ValueError(
            f"--call: only {SERVICE} methods are supported, got {call!r} (pass --proto or "
            "--protoset for another service)"
        )
    methods = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods_by_name
    method = methods.get(name)
    if method is None:
        raise ValueError(
            f"--call: {SERVICE} has no method {name!r} (it has: {', '.join(sorted(methods))})"
        )
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


def load_descriptors(options: Options) -> tuple[Any, list[str]]:
    """The descriptor pool (and its files' names) of ``--protoset`` (a FileDescriptorSet, as ``protoc
    --include_imports --descriptor_set_out`` writes it) or of ``--proto`` compiled with
    grpcio-tools' protoc."""
    from google.protobuf import descriptor_pb2, descriptor_pool

    if options.protoset is not None:
        flag, data = "--protoset", _read(options.protoset, "--protoset")
    else:
        assert options.proto is not None
        flag, data = "--proto", _compile(options.proto, options.import_paths)
    try:
        files = descriptor_pb2.FileDescriptorSet.FromString(data).file
    except DecodeError as e:
        raise ValueError(f"{flag}: not a FileDescriptorSet: {e}") from e
    pool = descriptor_pool.DescriptorPool()
    by_name = {f.name: f for f in files}
    added: set[str] = set()

    def add(name: str) -> None:
        if name in added:
            return
        file = by_name.get(name)
        if file is None:
            raise ValueError(f"{flag}: {name} is imported but not in the set (--include_imports)")
        for dependency in file.dependency:
            add(dependency)
        pool.Add(file)
        added.add(name)

    for file in files:
        add(file.name)
    return pool, [f.name for f in files]


def _read(path: Path, flag: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise ValueError(f"{flag}: cannot read {path}: {e.strerror}") from e


def _compile(proto: Path, import_paths: tuple[Path, ...]) -> bytes:
    try:
        from grpc_tools import protoc
    except ImportError:
        raise ValueError(
            "--proto needs grpcio-tools (pip install grpcio-tools), or pass a --protoset"
        ) from None
    if not proto.is_file():
        raise ValueError(f"--proto: {proto} is not a file")
    import importlib.resources
    import tempfile

    well_known = importlib.resources.files("grpc_tools") / "_proto"
    paths = [*import_paths, proto.parent]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "set.pb"
        code = protoc.main(
            [
                "protoc",
                *(f"-I{p}" for p in paths),
                f"-I{well_known}",
                "--include_imports",
                f"--descriptor_set_out={out}",
                str(proto.resolve().relative_to(proto.parent.resolve())),
            ]
        )
        if code != 0 or not out.exists():
            raise ValueError(f"--proto: protoc could not compile {proto} (see its message above)")
        return out.read_bytes()


def _resolve_in(call: str, pool: Any, files: list[str]) -> Method:
    from google.protobuf import message_factory

    text = call.strip().lstrip("/")
    service_name, sep, name = text.rpartition("/")
    if not sep:
        service_name, _, name = text.rpartition(".")
    if service_name:
        try:
            service = pool.FindServiceByName(service_name)
        except KeyError:
            raise ValueError(f"--call: no service {service_name!r} in the given files") from None
        method = service.methods_by_name.get(name)
        if method is None:
            raise ValueError(f"--call: {service_name} has no method {name!r}")
    else:
        found = [
            m
            for file in files
            for s in pool.FindFileByName(file).services_by_name.values()
            for m in s.methods
            if m.name == name
        ]
        if len(found) != 1:
            where = ", ".join(m.full_name for m in found) or "no service"
            raise ValueError(f"--call: {name!r} matches {where}; give SERVICE/{name}")
        method = found[0]
    if method.client_streaming != method.server_streaming:
        raise ValueError(f"--call: {method.name} is half-streaming; unary or bidirectional only")
    if method.client_streaming and method.full_name != f"{SERVICE}.{STREAM_INFER}":
        raise ValueError(f"--call: only {STREAM_INFER} is supported among streaming methods")
    return Method(
        name=method.name,
        path=f"/{method.containing_service.full_name}/{method.name}",
        streaming=method.client_streaming,
        request_type=message_factory.GetMessageClass(method.input_type),
    )


def static_request(options: Options, method: Method) -> bytes | None:
    """The serialised request from the options, or None when it must come from ModelMetadata."""
    if options.model is not None:
        if method.request_type.DESCRIPTOR.full_name != "inference.ModelInferRequest":
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
