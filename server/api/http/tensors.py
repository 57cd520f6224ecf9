"""V2 REST inference bodies: JSON tensors and Triton's binary tensor data extension.

A request body is a JSON object, optionally followed by binary tensor data; the
`Inference-Header-Content-Length` header says where the JSON ends. Each input carries either
`data` (a JSON array, flat or nested, row-major) or `parameters.binary_data_size` (its bytes in
the binary part, in input order). Parsing yields the same request shape the gRPC codec reads
(inputs + one raw buffer per input), so `server.api.codec.decode_request` applies every check of
the gRPC path to it: unknown, missing or repeated inputs, datatype and shape against the model,
element and row limits. What only JSON can get wrong (not an object, a shape that is not a list of
integers, strings where numbers belong, a `data` array of the wrong length) is checked here and
named by its JSON field.

Two rules for JSON `data`, as Triton's HTTP front has them: booleans (`true`/`false`) belong
to BOOL tensors only (numpy would read them as 1 and 0 in a numeric tensor), and BOOL tensors
take nothing else. BYTES elements given as JSON strings are those strings' UTF-8 bytes; bytes
that are not UTF-8 travel as binary tensor data, both ways: a reply whose BYTES output is not
UTF-8 is refused in JSON form, naming the output, rather than altered.

A reply is JSON `data` per output, or binary for the outputs asked so
(`outputs[].parameters.binary_data` or the request's `parameters.binary_data_output`).
"""

from __future__ import annotations

import math
import struct
from typing import Any

import numpy as np
import orjson

from server.errors import InvalidArgument
from server.types import NUMPY_TO_V2, V2_TO_NUMPY, InferResult

JSON = "application/json"
OCTET_STREAM = "application/octet-stream"
# V2 / Triton request parameters that change nothing here (scheduling hints of other servers).
_UNSUPPORTED_INPUT_PARAMETERS = ("shared_memory_region", "shared_memory_byte_size")
_UNSUPPORTED_OUTPUT_PARAMETERS = ("classification", "shared_memory_region")
_INT_BOUNDS: dict[np.dtype[Any], tuple[int, int]] = {
    np.dtype(t): (int(np.iinfo(t).min), int(np.iinfo(t).max))
    for t in (np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64)
}


class Tensor:
    """One input as `decode_request` reads it (InferInputTensor's fields, no typed contents)."""

    __slots__ = ("datatype", "name", "shape")

    def __init__(self, name: str, datatype: str, shape: list[int]) -> None:
        self.name = name
        self.datatype = datatype
        self.shape = shape

    def HasField(self, field: str) -> bool:
        return False


class Parameter:
    """A JSON parameter value as the codec reads an InferParameter (`WhichOneof`)."""

    __slots__ = ("_kind", "bool_param", "double_param", "int64_param", "string_param")

    def __init__(self, value: Any) -> None:
        self.bool_param = value if isinstance(value, bool) else False
        self.int64_param = value if type(value) is int else 0
        self.double_param = value if isinstance(value, float) else 0.0
        self.string_param = value if isinstance(value, str) else ""
        self._kind = (
            "bool_param"
            if isinstance(value, bool)
            else "int64_param"
            if type(value) is int
            else "double_param"
            if isinstance(value, float)
            else "string_param"
            if isinstance(value, str)
            else None
        )

    def WhichOneof(self, group: str) -> str | None:
        return self._kind


# Request parameters the codec reads (the rest are other servers' scheduling hints or the
# model's business, ignored as on gRPC).
CODEC_PARAMETERS = ("drift", "traffic")


class Output:
    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name


class Request:
    """A parsed REST inference request in the shape of a ModelInferRequest, plus which outputs
    the caller wants as binary tensor data."""

    __slots__ = (
        "all_binary",
        "binary_names",
        "binary_output",
        "id",
        "inputs",
        "model_name",
        "model_version",
        "outputs",
        "parameters",
        "raw_input_contents",
    )

    def __init__(self, model_name: str, model_version: str) -> None:
        self.model_name = model_name
        self.model_version = model_version
        self.id = ""
        self.inputs: list[Tensor] = []
        self.raw_input_contents: list[Any] = []
        self.outputs: list[Output] = []
        # All outputs binary (binary_data_output), or these by name (outputs[].binary_data).
        self.binary_output = False
        self.binary_names: frozenset[str] = frozenset()
        # Every input came as binary tensor data (none as JSON `data`).
        self.all_binary = False
        # The request parameters the codec reads (drift, traffic), as it reads them.
        self.parameters: dict[str, Parameter] = {}


def _where(index: int, name: object) -> str:
    return f"inputs[{index}] ({name!r})" if isinstance(name, str) else f"inputs[{index}]"


def _object(value: Any, field: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise InvalidArgument(f"{field}: expected a JSON object, got {_kind(value)}")
    return value


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def _bool(params: dict[str, Any], key: str, field: str) -> bool:
    value = params.get(key, False)
    if not isinstance(value, bool):
        raise InvalidArgument(f"{field}.{key}: expected true or false, got {_kind(value)}")
    return value


class Parser:
    """`parse_request` with a cache of validated JSON headers.

    Clients that send binary tensor data (tritonclient, perf_analyzer) repeat the same JSON
    header byte for byte, request after request, when they set no id: a header that parsed
    and validated once maps to its inputs, outputs and binary sizes, so the next request with
    it costs a dict lookup and the slicing of its binary part. Only headers whose inputs are
    all binary, with no id, up to 4 KiB, are kept (at most 1024; then the cache starts over).
    """

    MAX_HEADER_BYTES = 4096
    MAX_ENTRIES = 1024

    def __init__(self) -> None:
        self._templates: dict[bytes, tuple[Request, tuple[tuple[int, bool], ...], int]] = {}

    def parse(
        self, body: bytes, header_length: int | None, model_name: str, model_version: str
    ) -> Request:
        if header_length is None or header_length > self.MAX_HEADER_BYTES:
            return parse_request(body, header_length, model_name, model_version)
        head = body[:header_length]
        hit = self._templates.get(head)
        if hit is not None:
            template, parts, total = hit
            if total == len(body) - header_length:
                request = Request(model_name, model_version)
                request.inputs = template.inputs
                request.outputs = template.outputs
                request.binary_output = template.binary_output
                request.binary_names = template.binary_names
                request.parameters = template.parameters
                request.all_binary = True
                view = memoryview(body)
                offset = header_length
                raws = request.raw_input_contents
                for size, is_bytes in parts:
                    raw: Any = view[offset : offset + size]
                    raws.append(bytes(raw) if is_bytes else raw)
                    offset += size
                return request
        request = parse_request(body, header_length, model_name, model_version)
        if request.all_binary and not request.id:
            parts = tuple(
                (len(r), t.datatype == "BYTES")
                for t, r in zip(request.inputs, request.raw_input_contents, strict=True)
            )
            if len(self._templates) >= self.MAX_ENTRIES:
                self._templates.clear()
            self._templates[bytes(head)] = (request, parts, len(body) - header_length)
        return request


def parse_request(
    body: bytes, header_length: int | None, model_name: str, model_version: str
) -> Request:
    """Split and parse a REST inference body; raises InvalidArgument naming the field."""
    if header_length is None:
        head: Any = body
        tail = memoryview(b"")
    else:
        if header_length > len(body):
            raise InvalidArgument(
                f"Inference-Header-Content-Length is {header_length} but the body has only "
                f"{len(body)} bytes"
            )
        view = memoryview(body)
        head, tail = view[:header_length], view[header_length:]
    try:
        doc = orjson.loads(head)
    except orjson.JSONDecodeError as exc:
        where = "the JSON header" if header_length is not None else "the request body"
        raise InvalidArgument(f"{where} is not valid JSON: {exc}") from None
    doc = _object(doc, "request body")
    request = Request(model_name, model_version)
    rid = doc.get("id", "")
    if not isinstance(rid, str):
        raise InvalidArgument(f"id: expected a string, got {_kind(rid)}")
    request.id = rid
    params = doc.get("parameters")
    if params is not None:
        request.binary_output = _bool(
            _object(params, "parameters"), "binary_data_output", "parameters"
        )
        request.parameters = {k: Parameter(params[k]) for k in CODEC_PARAMETERS if k in params}
    inputs = doc.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise InvalidArgument(
            "inputs: expected a non-empty array of input tensors"
            + ("" if inputs is None else f", got {_kind(inputs)}")
        )
    offset = 0
    all_binary = True
    for index, item in enumerate(inputs):
        tensor = _object(item, f"inputs[{index}]")
        name = tensor.get("name")
        where = _where(index, name)
        if not isinstance(name, str):
            raise InvalidArgument(f"{where}.name: expected a string, got {_kind(name)}")
        datatype = tensor.get("datatype")
        if not isinstance(datatype, str):
            raise InvalidArgument(f"{where}.datatype: expected a string, got {_kind(datatype)}")
        shape = tensor.get("shape")
        if shape.__class__ is not list:
            raise InvalidArgument(f"{where}.shape: expected an array of integers")
        for d in shape:
            if d.__class__ is not int:  # orjson makes exact ints; bool is not one
                raise InvalidArgument(f"{where}.shape: expected an array of integers")
        size = None
        tensor_params = tensor.get("parameters")
        if tensor_params is not None:
            tensor_params = _object(tensor_params, f"{where}.parameters")
            for key in _UNSUPPORTED_INPUT_PARAMETERS:
                if key in tensor_params:
                    raise InvalidArgument(
                        f"{where}.parameters.{key}: shared memory is not supported; send the "
                        "tensor as data or binary_data_size"
                    )
            size = tensor_params.get("binary_data_size")
            if size is not None and (
                not isinstance(size, int) or isinstance(size, bool) or size < 0
            ):
                raise InvalidArgument(
                    f"{where}.parameters.binary_data_size: expected an integer >= 0"
                )
        if size is not None:
            if "data" in tensor:
                raise InvalidArgument(
                    f"{where}: give data or parameters.binary_data_size, not both"
                )
            if offset + size > len(tail):
                raise InvalidArgument(
                    f"{where}.parameters.binary_data_size is {size} but only "
                    f"{len(tail) - offset} bytes of binary data are left after the JSON header "
                    "(Inference-Header-Content-Length)"
                )
            raw: Any = tail[offset : offset + size]
            offset += size
            _check_binary_size(name, datatype, shape, size)
            if datatype == "BYTES":
                raw = bytes(raw)
        else:
            all_binary = False
            if "data" not in tensor:
                raise InvalidArgument(
                    f"{where}: data is required (or parameters.binary_data_size with binary "
                    "tensor data)"
                )
            raw = _json_data(name, datatype, shape, tensor["data"])
        request.inputs.append(Tensor(name, datatype, shape))
        request.raw_input_contents.append(raw)
    request.all_binary = all_binary
    if offset != len(tail):
        raise InvalidArgument(
            f"the body holds {len(tail)} bytes of binary data after the JSON header; the inputs' "
            f"binary_data_size add up to {offset}"
        )
    outputs = doc.get("outputs")
    if outputs is not None:
        if not isinstance(outputs, list):
            raise InvalidArgument(f"outputs: expected an array, got {_kind(outputs)}")
        binary = []
        for index, item in enumerate(outputs):
            out = _object(item, f"outputs[{index}]")
            name = out.get("name")
            if not isinstance(name, str):
                raise InvalidArgument(
                    f"outputs[{index}].name: expected a string, got {_kind(name)}"
                )
            out_params = out.get("parameters")
            if out_params is not None:
                out_params = _object(out_params, f"outputs[{index}].parameters")
                for key in _UNSUPPORTED_OUTPUT_PARAMETERS:
                    if key in out_params:
                        raise InvalidArgument(
                            f"outputs[{index}] ({name!r}).parameters.{key} is not supported"
                        )
                if _bool(out_params, "binary_data", f"outputs[{index}].parameters"):
                    binary.append(name)
            request.outputs.append(Output(name))
        request.binary_names = frozenset(binary)
    return request


def _count(shape: list[int]) -> int | None:
    """Elements in `shape`, or None when a dimension is negative (the codec names that)."""
    if shape and min(shape) < 0:
        return None
    return math.prod(shape)


def _check_binary_size(name: str, datatype: str, shape: list[int], size: int) -> None:
    dtype = V2_TO_NUMPY.get(datatype)
    count = _count(shape)
    if dtype is None or datatype == "BYTES" or count is None:
        return  # the codec checks unknown datatypes, bad shapes and BYTES element counts
    need = count * dtype.itemsize
    if size != need:
        raise InvalidArgument(
            f"input '{name}': binary_data_size is {size} bytes; shape {shape} of {datatype} "
            f"needs {need}"
        )


def _json_data(name: str, datatype: str, shape: list[int], data: Any) -> Any:
    """`data` as the raw little-endian buffer the codec decodes (numpy-direct, no per-element
    Python for numbers)."""
    dtype = V2_TO_NUMPY.get(datatype)
    count = _count(shape)
    if dtype is None or count is None:
        return b""  # the codec rejects the datatype or the shape, naming it
    if not isinstance(data, list):
        data = [data]  # a scalar stands for a one-element tensor
    if datatype == "BYTES":
        items = _strings(name, data)
        if len(items) != count:
            raise InvalidArgument(
                f"input '{name}': data holds {len(items)} values; shape {shape} needs {count}"
            )
        return b"".join(struct.pack("<I", len(b)) + b for b in items)
    try:
        array = np.asarray(data)
    except ValueError:
        raise InvalidArgument(
            f"input '{name}': data is not a regular array (nested rows of unequal length)"
        ) from None
    kind = array.dtype.kind
    if array.size != count:
        raise InvalidArgument(
            f"input '{name}': data holds {array.size} values; shape {shape} needs {count}"
        )
    if count == 0:
        return b""
    if datatype == "BOOL":
        if kind != "b":
            raise InvalidArgument(f"input '{name}' of datatype BOOL: data must hold true/false")
    elif kind == "b" or (kind in "iuf" and _holds_bool(data)):
        # Triton refuses JSON booleans for numeric tensors (numpy would read true as 1).
        raise InvalidArgument(
            f"input '{name}' of datatype {datatype}: data holds true/false; only BOOL "
            "tensors take booleans, numbers are JSON numbers"
        )
    elif kind in "US":
        raise InvalidArgument(f"input '{name}' of datatype {datatype}: data holds strings")
    elif kind not in "biuf":
        raise InvalidArgument(
            f"input '{name}' of datatype {datatype}: data holds values that are not numbers "
            "(null, mixed types, or integers too large)"
        )
    elif dtype.kind in "iu":
        if kind == "f":
            # numpy reads [[2**64 - 1, 0], ...] as floats: exact integers still fit
            return _integers_from_floats(name, datatype, dtype, data, array)
        low, high = _INT_BOUNDS[dtype]
        if int(array.min()) < low or int(array.max()) > high:
            raise InvalidArgument(f"input '{name}': a value does not fit {datatype}")
    return np.ascontiguousarray(array, dtype=dtype).tobytes()


def _holds_bool(data: Any) -> bool:
    """Whether a regular nested list (np.asarray took it) holds a bool anywhere: one type scan
    per innermost row, in C (`map(type, ...)`), no per-element Python."""
    if not isinstance(data, list):
        return data.__class__ is bool
    if data and isinstance(data[0], list):
        return any(_holds_bool(row) for row in data)
    return bool in set(map(type, data))


def _integers_from_floats(
    name: str, datatype: str, dtype: np.dtype[Any], data: list[Any], inferred: np.ndarray
) -> bytes:
    try:
        exact = np.array(data, dtype=dtype)
    except (OverflowError, ValueError, TypeError):
        raise InvalidArgument(f"input '{name}': a value does not fit {datatype}") from None
    if not np.array_equal(exact.astype(np.float64), inferred):
        raise InvalidArgument(f"input '{name}' of datatype {datatype}: data must hold integers")
    return exact.tobytes()


def _strings(name: str, data: list[Any]) -> list[bytes]:
    out: list[bytes] = []
    stack = [iter(data)]
    while stack:
        for item in stack[-1]:
            if isinstance(item, str):
                out.append(item.encode())
            elif isinstance(item, list):
                stack.append(iter(item))
                break
            else:
                raise InvalidArgument(
                    f"input '{name}' of datatype BYTES: data holds {_kind(item)}; BYTES elements "
                    "are JSON strings"
                )
        else:
            stack.pop()
    return out


def _bytes_blob(array: np.ndarray) -> bytes:
    parts = []
    for item in array.ravel():
        data = item if isinstance(item, bytes) else str(item).encode()
        parts.append(struct.pack("<I", len(data)))
        parts.append(data)
    return b"".join(parts)


def _json_strings(name: str, array: np.ndarray) -> list[str]:
    """A BYTES output as JSON strings. JSON strings are UTF-8: bytes that are not cannot be
    one without changing them, so the reply is refused, naming the output and the remedy
    (binary tensor data carries any bytes)."""
    out = []
    for v in array.ravel():
        if isinstance(v, bytes):
            try:
                out.append(v.decode("utf-8"))
            except UnicodeDecodeError:
                raise InvalidArgument(
                    f"output '{name}' holds bytes that are not UTF-8, which a JSON string cannot "
                    "carry; ask for it as binary tensor data (outputs[].parameters.binary_data: "
                    "true, or parameters.binary_data_output: true)"
                ) from None
        else:
            out.append(str(v))
    return out


def encode_response(result: InferResult, request: Request) -> tuple[list[bytes], int | None]:
    """The reply body as parts to join, and the JSON header's length when binary data follows."""
    outputs = []
    blobs = []
    binary_all = request.binary_output
    binary_names = request.binary_names
    for name, array in result.outputs.items():
        datatype = NUMPY_TO_V2.get(array.dtype, "BYTES")
        entry: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(array.shape)}
        if binary_all or name in binary_names:
            blob = (
                _bytes_blob(array) if datatype == "BYTES" else np.ascontiguousarray(array).tobytes()
            )
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        elif datatype == "BYTES":
            entry["data"] = _json_strings(name, array)
        else:
            entry["data"] = np.ascontiguousarray(array).reshape(-1)
        outputs.append(entry)
    doc: dict[str, Any] = {"model_name": result.model, "model_version": result.version}
    if result.id:
        doc["id"] = result.id
    if result.parameters:
        doc["parameters"] = result.parameters
    doc["outputs"] = outputs
    head = orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY)
    if blobs:
        return [head, *blobs], len(head)
    return [head], None
