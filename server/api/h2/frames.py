"""HTTP/2 frames (RFC 9113) and the HPACK header blocks (RFC 7541) the native gRPC transport
writes, plus gRPC's own wire details (message prefix, grpc-timeout, grpc-message encoding).

Every header block written here uses the static table and literals "without indexing", never
the dynamic table, so the encoder has no state to keep in step with the peer's decoder and
the blocks of a success (`RESPONSE_HEADERS`, `OK_TRAILERS`) are constants.
"""

from __future__ import annotations

import base64
import logging
import re
import struct
from typing import Any

log = logging.getLogger(__name__)

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

# frame types
DATA = 0x0
HEADERS = 0x1
PRIORITY = 0x2
RST_STREAM = 0x3
SETTINGS = 0x4
PUSH_PROMISE = 0x5
PING = 0x6
GOAWAY = 0x7
WINDOW_UPDATE = 0x8
CONTINUATION = 0x9

# flags
END_STREAM = 0x1
ACK = 0x1
END_HEADERS = 0x4
PADDED = 0x8
PRIORITY_FLAG = 0x20

# error codes
NO_ERROR = 0x0
PROTOCOL_ERROR = 0x1
INTERNAL_ERROR = 0x2
FLOW_CONTROL_ERROR = 0x3
STREAM_CLOSED = 0x5
FRAME_SIZE_ERROR = 0x6
REFUSED_STREAM = 0x7
CANCEL = 0x8
COMPRESSION_ERROR = 0x9
ENHANCE_YOUR_CALM = 0xB

# settings
SETTINGS_HEADER_TABLE_SIZE = 0x1
SETTINGS_ENABLE_PUSH = 0x2
SETTINGS_MAX_CONCURRENT_STREAMS = 0x3
SETTINGS_INITIAL_WINDOW_SIZE = 0x4
SETTINGS_MAX_FRAME_SIZE = 0x5
SETTINGS_MAX_HEADER_LIST_SIZE = 0x6

DEFAULT_WINDOW = 65535
DEFAULT_MAX_FRAME = 16384
MAX_WINDOW = 2**31 - 1
MAX_FRAME_LIMIT = 2**24 - 1

FRAME_HEADER = struct.Struct(">BHBBL")  # length (24 bits as 8 + 16), type, flags, stream id
_SETTING = struct.Struct(">HL")
_U32 = struct.Struct(">L")
_GOAWAY = struct.Struct(">LL")
MESSAGE_PREFIX = struct.Struct(">BL")  # compressed flag, length


def frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    size = len(payload)
    return FRAME_HEADER.pack(size >> 16, size & 0xFFFF, kind, flags, stream) + payload


def header(kind: int, flags: int, stream: int, size: int) -> bytes:
    """A frame's 9-byte header alone (the payload follows it in the same write)."""
    return FRAME_HEADER.pack(size >> 16, size & 0xFFFF, kind, flags, stream)


def settings_frame(values: dict[int, int]) -> bytes:
    return frame(SETTINGS, 0, 0, b"".join(_SETTING.pack(k, v) for k, v in values.items()))


def parse_settings(payload: bytes) -> list[tuple[int, int]]:
    return [_SETTING.unpack_from(payload, i) for i in range(0, len(payload), 6)]


def window_update(stream: int, increment: int) -> bytes:
    return frame(WINDOW_UPDATE, 0, stream, _U32.pack(increment))


def rst_stream(stream: int, code: int) -> bytes:
    return frame(RST_STREAM, 0, stream, _U32.pack(code))


def goaway(last_stream: int, code: int, debug: bytes = b"") -> bytes:
    return frame(GOAWAY, 0, 0, _GOAWAY.pack(last_stream, code) + debug)


def u32(payload: bytes) -> int:
    return int(_U32.unpack_from(payload)[0])


# ---- HPACK ------------------------------------------------------------------------------------


def _integer(value: int, prefix_bits: int, first: int) -> bytes:
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes((first | value,))
    out = bytearray((first | limit,))
    value -= limit
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _string(data: bytes) -> bytes:
    return _integer(len(data), 7, 0) + data


def literal(name: bytes, value: bytes) -> bytes:
    """One header field, literal without indexing, new name, no Huffman coding."""
    return b"\x00" + _string(name) + _string(value)


_CONTENT_TYPE = b"\x0f\x10" + _string(b"application/grpc")  # static index 31, literal value
RESPONSE_HEADERS = b"\x88" + _CONTENT_TYPE  # :status 200 (static index 8), content-type
OK_TRAILERS = literal(b"grpc-status", b"0")


_KEY = re.compile(rb"[0-9a-z_.-]+")
_VALUE = re.compile(rb"[\x20-\x7e]*")


def metadata_block(metadata: Any) -> bytes:
    """Custom metadata as header fields: keys lower-case, `-bin` values base64 (unpadded).

    A key that is not a legal gRPC metadata key (digits, lower-case letters, `_ . -`), a
    reserved one (`grpc-*`, pseudo-headers), or a text value with bytes outside printable ASCII
    is left out and logged: sent, it would make the peer reset the stream."""
    out = []
    for key, value in metadata:
        try:
            name = str(key).lower().encode("ascii")
            if name.endswith(b"-bin"):
                raw = value if isinstance(value, bytes) else str(value).encode("utf-8")
                encoded = base64.b64encode(raw).rstrip(b"=")
            else:
                encoded = value.encode("ascii") if isinstance(value, str) else bytes(value)
        except (UnicodeError, TypeError, ValueError):
            log.warning("metadata %r left out: not ASCII", key)
            continue
        if not _KEY.fullmatch(name) or name.startswith(b"grpc-") or not _VALUE.fullmatch(encoded):
            log.warning("metadata %r left out: not a valid gRPC metadata key or value", key)
            continue
        out.append(literal(name, encoded))
    return b"".join(out)


# gRPC's grpc-message: UTF-8, then every byte outside 0x20-0x7E, and '%', as %XX.
_UNSAFE = re.compile(rb"[^\x20-\x24\x26-\x7e]")


def encode_message(text: str) -> bytes:
    return _UNSAFE.sub(lambda m: b"%%%02X" % m.group()[0], text.encode("utf-8"))


def trailers(code: int, message: str, metadata: Any = ()) -> bytes:
    block = literal(b"grpc-status", str(code).encode("ascii"))
    if message:
        block += literal(b"grpc-message", encode_message(message))
    if metadata:
        block += metadata_block(metadata)
    return block


# ---- gRPC headers -----------------------------------------------------------------------------

_TIMEOUT = re.compile(rb"(\d{1,8})([HMSmun])")
_UNIT_S = {b"H": 3600.0, b"M": 60.0, b"S": 1.0, b"m": 1e-3, b"u": 1e-6, b"n": 1e-9}


def parse_timeout(value: bytes) -> float | None:
    """grpc-timeout in seconds; None when it is not `1-8 digits + unit`."""
    match = _TIMEOUT.fullmatch(value)
    if match is None:
        return None
    return int(match.group(1)) * _UNIT_S[match.group(2)]


def decode_binary(value: bytes) -> bytes:
    """A `-bin` metadata value: base64, padded or not."""
    return base64.b64decode(value + b"=" * (-len(value) % 4))
