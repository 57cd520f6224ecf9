"""Hand-encoded ModelInferResponse bytes for the raw fast path.

A raw reply is a header that depends only on (model, version, output names, datatypes, shapes) —
cached as bytes — followed by the request id and the output buffers. Building that costs a few
byte concatenations instead of a protobuf message per reply. The encoding is plain protobuf wire
format (length-delimited fields, packed int64 shapes), checked in the tests against the
upb-built message from `codec.encode_result`.
"""

from __future__ import annotations

import numpy as np

from server.types import NUMPY_TO_V2, InferResult

_MAX_HEADERS = 4096


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


def _tensor_header(name: str, datatype: str, shape: tuple[int, ...]) -> bytes:
    packed = b"".join(varint(d) for d in shape)
    body = _field(0x0A, name.encode()) + _field(0x12, datatype.encode()) + _field(0x1A, packed)
    return _field(0x2A, body)  # ModelInferResponse.outputs = 5


class RawResponseEncoder:
    """Encodes raw-path results; raises KeyError for what it does not handle (BYTES outputs,
    parameters), which the caller answers with the general protobuf encoder."""

    def __init__(self) -> None:
        self._headers: dict[tuple[object, ...], bytes] = {}

    def header(self, result: InferResult) -> bytes:
        key = (
            result.model,
            result.version,
            *((name, a.dtype, a.shape) for name, a in result.outputs.items()),
        )
        cached = self._headers.get(key)
        if cached is not None:
            return cached
        parts = [_field(0x0A, result.model.encode()), _field(0x12, result.version.encode())]
        for name, array in result.outputs.items():
            datatype = NUMPY_TO_V2[array.dtype]
            if datatype == "BYTES":
                raise KeyError(name)
            parts.append(_tensor_header(name, datatype, array.shape))
        header = b"".join(parts)
        if len(self._headers) >= _MAX_HEADERS:
            self._headers.clear()
        self._headers[key] = header
        return header

    def encode(self, result: InferResult) -> bytes:
        if result.parameters:
            raise KeyError("parameters")
        parts = [self.header(result)]
        if result.id:
            parts.append(_field(0x1A, result.id.encode()))
        for array in result.outputs.values():
            data = np.ascontiguousarray(array).tobytes()
            parts.append(b"\x32" + _len(len(data)) + data)  # raw_output_contents = 6
        return b"".join(parts)


def stream_reply(response: bytes) -> bytes:
    """ModelStreamInferResponse{infer_response = 2} around an encoded ModelInferResponse."""
    return b"\x12" + _len(len(response)) + response
