"""The REST binding's body parsing and reply encoding (server/api/http/tensors.py), in process:
JSON data to the codec's raw buffers, binary tensor data, the header cache, the reply forms."""

from __future__ import annotations

import json
import struct
from typing import Any

import numpy as np
import orjson
import pytest

from server.api.http.tensors import Parser, encode_response, parse_request
from server.errors import InvalidArgument
from server.types import InferResult


def _json(*inputs: dict[str, Any], **extra: Any) -> bytes:
    return json.dumps({"inputs": list(inputs), **extra}).encode()


def _binary(arrays: dict[str, np.ndarray], **extra: Any) -> tuple[bytes, int]:
    blobs = [np.ascontiguousarray(a).tobytes() for a in arrays.values()]
    head = json.dumps(
        {
            "inputs": [
                {"name": n, "datatype": "FP32", "shape": list(a.shape),
                 "parameters": {"binary_data_size": len(b)}}
                for (n, a), b in zip(arrays.items(), blobs, strict=True)
            ],
            **extra,
        }
    ).encode()  # fmt: skip
    return head + b"".join(blobs), len(head)


@pytest.mark.parametrize(
    ("datatype", "data", "expected"),
    [
        ("FP32", [[1.5, 2], [3, 4]], np.array([1.5, 2, 3, 4], np.float32)),
        ("FP32", [1.5, 2, 3, 4], np.array([1.5, 2, 3, 4], np.float32)),
        ("INT8", [[-128, 127], [0, 1]], np.array([-128, 127, 0, 1], np.int8)),
        ("UINT64", [[2**64 - 1, 0], [1, 2]], np.array([2**64 - 1, 0, 1, 2], np.uint64)),
        ("BOOL", [[True, False], [False, True]], np.array([1, 0, 0, 1], np.bool_)),
    ],
)
def test_json_data_becomes_the_raw_little_endian_buffer(
    datatype: str, data: list[Any], expected: np.ndarray
) -> None:
    request = parse_request(
        _json({"name": "x", "datatype": datatype, "shape": [2, 2], "data": data}), None, "m", ""
    )
    assert bytes(request.raw_input_contents[0]) == expected.tobytes()
    assert request.inputs[0].shape == [2, 2]
    assert not request.all_binary


def test_bytes_elements_are_json_strings_length_prefixed() -> None:
    request = parse_request(
        _json({"name": "id", "datatype": "BYTES", "shape": [2, 1], "data": [["ab"], ["ç"]]}),
        None,
        "m",
        "",
    )
    raw = request.raw_input_contents[0]
    assert raw == struct.pack("<I", 2) + b"ab" + struct.pack("<I", 2) + "ç".encode()


@pytest.mark.parametrize(
    ("datatype", "data", "message"),
    [
        ("INT8", [[128, 0]], "a value does not fit INT8"),
        ("UINT8", [[-1, 0]], "a value does not fit UINT8"),
        ("INT32", [[1.5, 2]], "data must hold integers"),
        ("BOOL", [[1, 0]], "data must hold true/false"),
        ("FP32", [[None, 1]], "not numbers"),
        ("FP32", [["1", "2"]], "data holds strings"),
        ("INT64", [[2**70, 1]], "does not fit INT64"),
        ("UINT64", [[2**64, 1]], "does not fit UINT64"),
        ("FP32", [[1, 2, 3]], "data holds 3 values; shape [1, 2] needs 2"),
        ("BYTES", [[1, 2]], "BYTES elements are JSON strings"),
    ],
)
def test_json_data_that_does_not_fit_its_datatype_is_named(
    datatype: str, data: list[Any], message: str
) -> None:
    body = _json({"name": "x", "datatype": datatype, "shape": [1, 2], "data": data})
    with pytest.raises(InvalidArgument, match="input 'x'") as err:
        parse_request(body, None, "m", "")
    assert message in err.value.message


@pytest.mark.parametrize(
    ("datatype", "data"),
    [
        ("FP32", [[True, False]]),  # all booleans
        ("FP32", [[1.5, True]]),  # one boolean among numbers: numpy would read 1.0
        ("INT32", [[1, False]]),
        ("INT8", [True, False]),  # flat
        ("UINT64", [[2**64 - 1, True]]),
        ("FP64", True),  # a scalar
    ],
)
def test_json_booleans_are_refused_for_numeric_tensors_as_triton_does(
    datatype: str, data: Any
) -> None:
    shape = [1] if data is True else [1, 2]
    body = _json({"name": "x", "datatype": datatype, "shape": shape, "data": data})
    with pytest.raises(InvalidArgument, match="input 'x'") as err:
        parse_request(body, None, "m", "")
    assert f"of datatype {datatype}: data holds true/false" in err.value.message
    assert "only BOOL tensors take booleans" in err.value.message


@pytest.mark.parametrize("data", [[[True, 1]], [[0.0, 1.0]], [["true", "false"]]])
def test_bool_tensors_take_only_json_booleans(data: list[Any]) -> None:
    body = _json({"name": "x", "datatype": "BOOL", "shape": [1, 2], "data": data})
    with pytest.raises(InvalidArgument, match="input 'x' of datatype BOOL: data must hold true"):
        parse_request(body, None, "m", "")


def test_json_strings_that_are_not_utf8_never_reach_the_codec() -> None:
    """JSON text is UTF-8: a raw 0xff byte or a lone surrogate escape is not valid JSON."""
    head = b'{"inputs":[{"name":"s","datatype":"BYTES","shape":[1],"data":["'
    for text in (bytes([0xFF]), rb"\udc80"):
        with pytest.raises(InvalidArgument, match="the request body is not valid JSON"):
            parse_request(head + text + b'"]}]}', None, "m", "")


def test_binary_inputs_are_views_of_the_body_in_input_order() -> None:
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    b = np.arange(4, dtype=np.float32).reshape(2, 2) + 100
    body, n = _binary({"a": a, "b": b})
    request = parse_request(body, n, "m", "1")
    assert [t.name for t in request.inputs] == ["a", "b"]
    assert np.array_equal(np.frombuffer(request.raw_input_contents[0], np.float32), a.ravel())
    assert np.array_equal(np.frombuffer(request.raw_input_contents[1], np.float32), b.ravel())
    assert request.all_binary
    assert (request.model_name, request.model_version) == ("m", "1")


def test_the_header_cache_reuses_a_validated_header_and_still_checks_the_tail() -> None:
    parser = Parser()
    x = np.ones((1, 3), np.float32)
    body, n = _binary({"x": x})
    first = parser.parse(body, n, "m", "")
    second = parser.parse(body[:n] + (x * 7).tobytes(), n, "m", "")
    assert second.inputs is first.inputs  # the cached, validated header
    assert np.array_equal(np.frombuffer(second.raw_input_contents[0], np.float32), [7, 7, 7])
    with pytest.raises(InvalidArgument, match="binary_data_size is 12 but only 8 bytes"):
        parser.parse(body[:-4], n, "m", "")  # a short tail never takes the cached path
    with_id, m = _binary({"x": x}, id="r1")
    assert parser.parse(with_id, m, "m", "").id == "r1"
    assert parser.parse(with_id, m, "m", "").inputs is not parser.parse(with_id, m, "m", "").inputs


def _result(**params: object) -> InferResult:
    return InferResult(
        model="m",
        version="2",
        id="r",
        outputs={
            "label": np.array([1, 0], np.int64),
            "p": np.array([[0.25, 0.75], [0.5, 0.5]], np.float32),
        },
        parameters=dict(params),
    )


def test_replies_are_json_binary_or_mixed_as_asked() -> None:
    plain = parse_request(_json({"name": "x", "datatype": "FP32", "shape": [1], "data": [1]}),
                          None, "m", "")  # fmt: skip
    parts, header = encode_response(_result(route="canary"), plain)
    assert header is None
    doc = orjson.loads(parts[0])
    assert doc["parameters"] == {"route": "canary"}
    assert doc["outputs"] == [
        {"name": "label", "datatype": "INT64", "shape": [2], "data": [1, 0]},
        {"name": "p", "datatype": "FP32", "shape": [2, 2], "data": [0.25, 0.75, 0.5, 0.5]},
    ]
    mixed = parse_request(
        _json({"name": "x", "datatype": "FP32", "shape": [1], "data": [1]},
              outputs=[{"name": "p", "parameters": {"binary_data": True}}, {"name": "label"}]),
        None, "m", "",
    )  # fmt: skip
    parts, header = encode_response(_result(), mixed)
    assert header == len(parts[0])
    doc = orjson.loads(parts[0])
    assert doc["outputs"][0]["data"] == [1, 0]
    assert doc["outputs"][1]["parameters"] == {"binary_data_size": 16}
    assert parts[1] == np.array([[0.25, 0.75], [0.5, 0.5]], np.float32).tobytes()


def _bytes_result(*values: bytes) -> InferResult:
    return InferResult(
        model="m",
        version="1",
        id="",
        outputs={"s": np.array(values, dtype=object)},
        parameters={},
    )


def test_a_bytes_output_that_is_utf8_is_answered_as_json_strings() -> None:
    plain = parse_request(_json({"name": "x", "datatype": "FP32", "shape": [1], "data": [1]}),
                          None, "m", "")  # fmt: skip
    parts, header = encode_response(_bytes_result("ç".encode(), b"ab"), plain)
    assert header is None
    assert orjson.loads(parts[0])["outputs"][0]["data"] == ["ç", "ab"]


def test_a_bytes_output_that_is_not_utf8_is_refused_as_json_and_carried_as_binary() -> None:
    plain = parse_request(_json({"name": "x", "datatype": "FP32", "shape": [1], "data": [1]}),
                          None, "m", "")  # fmt: skip
    with pytest.raises(InvalidArgument, match="output 's' holds bytes that are not UTF-8") as err:
        encode_response(_bytes_result(b"\xff\x00", b"ok"), plain)
    assert "binary_data" in err.value.message
    binary = parse_request(
        _json({"name": "x", "datatype": "FP32", "shape": [1], "data": [1]},
              parameters={"binary_data_output": True}),
        None, "m", "",
    )  # fmt: skip
    parts, header = encode_response(_bytes_result(b"\xff\x00", b"ok"), binary)
    assert header is not None
    blob = b"".join(parts)[header:]
    assert blob == struct.pack("<I", 2) + b"\xff\x00" + struct.pack("<I", 2) + b"ok"
