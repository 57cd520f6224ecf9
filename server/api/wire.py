"""Hand-encoded ModelInferResponse bytes for the raw fast path.

A raw reply is a header that depends only on (model, version, output names, datatypes, shapes) —
cached as bytes — followed by the request id and the output buffers. Building that costs a few
byte concatenations instead of a protobuf message per reply. The encoding is plain protobuf wire
format (length-delimited fields, packed int64 shapes), checked in the tests against the
upb-built message from `codec.encode_result`.
"""

from __future__ import annotations

import operator

from server.types import NUMPY_TO_V2, InferResult

_MAX_HEADERS = 4096
_shape = operator.attrgetter("shape")


def varint(value: int) -> bytes:
    out = bytearray()
    value &= (1 << 64) - 1  # int64 as two's complement
    while True:
        low = value & 0x7F
        value >>= 7
        if value:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


_SMALL = [varint(i) for i in range(128)]


def _len(n: int) -> bytes:
    return _SMALL[n] if n < 128 else varint(n)


def _field(tag: int, payload: bytes) -> bytes:
    return bytes((tag,)) + _len(len(payload)) + payload


def _scalar(tag: int, payload: bytes) -> bytes:
    """A proto3 singular field: omitted when empty, as protobuf's own encoder does."""
    return _field(tag, payload) if payload else b""


def _tensor_header(name: str, datatype: str, shape: tuple[int, ...]) -> bytes:
    packed = b"".join(varint(d) for d in shape)
    body = _scalar(0x0A, name.encode()) + _scalar(0x12, datatype.encode()) + _scalar(0x1A, packed)
    return _field(0x2A, body)  # ModelInferResponse.outputs = 5


class RawResponseEncoder:
    """Encodes raw-path results; raises KeyError for what it does not handle (BYTES outputs,
    parameters), which the caller answers with the general protobuf encoder.

    Fields go in field-number order (model_name 1, model_version 2, id 3, outputs 5,
    raw_output_contents 6) and empty singular fields are left out, so the bytes equal protobuf's
    own serialisation of the same message (a property test checks it byte for byte)."""

    def __init__(self) -> None:
        self._headers: dict[tuple[object, ...], tuple[bytes, bytes]] = {}

    def header(self, result: InferResult) -> tuple[bytes, bytes]:
        """(model name + version, output tensor headers): the cached parts around the id."""
        # Names and shapes fix the header; a model's output datatypes are fixed per name.
        outputs = result.outputs
        key = (result.model, result.version, tuple(outputs), tuple(map(_shape, outputs.values())))
        cached = self._headers.get(key)
        if cached is not None:
            return cached
        prefix = _scalar(0x0A, result.model.encode()) + _scalar(0x12, result.version.encode())
        parts = []
        for name, array in result.outputs.items():
            datatype = NUMPY_TO_V2[array.dtype]
            if datatype == "BYTES":
                raise KeyError(name)
            parts.append(_tensor_header(name, datatype, array.shape))
        header = (prefix, b"".join(parts))
        if len(self._headers) >= _MAX_HEADERS:
            self._headers.clear()
        self._headers[key] = header
        return header

    def encode(self, result: InferResult) -> bytes:
        if result.parameters:
            raise KeyError("parameters")
        prefix, outputs = self.header(result)
        parts = [prefix]
        if result.id:
            parts.append(_field(0x1A, result.id.encode()))
        parts.append(outputs)
        for array in result.outputs.values():
            data = array.tobytes()  # C order, whatever the array's layout
            parts.append(b"\x32" + _len(len(data)) + data)  # raw_output_contents = 6
        return b"".join(parts)


def stream_reply(response: bytes) -> bytes:
    """ModelStreamInferResponse{infer_response = 2} around an encoded ModelInferResponse."""
    return b"\x12" + _len(len(response)) + response
