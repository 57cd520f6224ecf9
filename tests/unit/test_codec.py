"""The V2 tensor codec: ModelInferRequest -> InferRequest, InferResult -> ModelInferResponse."""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from server._proto import inference_pb2 as pb
from server.api.codec import Limits, decode_request, encode_result
from server.errors import InvalidArgument, ResourceExhausted
from server.types import InferResult, ModelSignature, TensorSpec

SIG = ModelSignature(
    inputs=(TensorSpec("input", "FP32", (-1, 15)),),
    outputs=(TensorSpec("label", "INT64", (-1,)), TensorSpec("probabilities", "FP32", (-1, 2))),
)
BYTES_SIG = ModelSignature(
    inputs=(TensorSpec("text", "BYTES", (-1,)),), outputs=(TensorSpec("echo", "BYTES", (-1,)),)
)
INT8_SIG = ModelSignature(
    inputs=(TensorSpec("small", "INT8", (-1, 2)),), outputs=(TensorSpec("y", "INT8", (-1, 2)),)
)
FP16_SIG = ModelSignature(
    inputs=(TensorSpec("half", "FP16", (-1, 2)),), outputs=(TensorSpec("y", "FP16", (-1, 2)),)
)
LIMITS = Limits(max_batch_size=8, max_elements=1000)

Tensor = pb.ModelInferRequest.InferInputTensor
Requested = pb.ModelInferRequest.InferRequestedOutputTensor


def features(rows: int = 2) -> np.ndarray:
    return np.arange(rows * 15, dtype=np.float32).reshape(rows, 15) / 7


def raw_request(x: np.ndarray | None = None, outputs: tuple[str, ...] = ()) -> Any:
    x = features() if x is None else x
    return pb.ModelInferRequest(
        model_name="churn",
        id="req-1",
        inputs=[Tensor(name="input", datatype="FP32", shape=x.shape)],
        raw_input_contents=[x.tobytes()],
        outputs=[Requested(name=n) for n in outputs],
    )


def typed_request(x: np.ndarray | None = None) -> Any:
    x = features() if x is None else x
    tensor = Tensor(name="input", datatype="FP32", shape=x.shape)
    tensor.contents.fp32_contents.extend(x.ravel().tolist())
    return pb.ModelInferRequest(model_name="churn", id="req-1", inputs=[tensor])


def length_prefixed(items: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(i)) + i for i in items)


def decode(request: Any, signature: ModelSignature = SIG, limits: Limits = LIMITS) -> Any:
    return decode_request(request, signature, limits, "3", 12.5)


# ---- decoding -------------------------------------------------------------------------------


def test_raw_input_decodes_to_a_read_only_view_of_the_model_shape_and_dtype() -> None:
    x = features(3)
    decoded = decode(raw_request(x))
    array = decoded.inputs["input"]
    assert array.dtype == np.float32
    assert array.shape == (3, 15)
    assert not array.flags.writeable
    assert not array.flags.owndata  # a view over the request's bytes, not a copy
    np.testing.assert_array_equal(array, x)
    assert decoded.rows == 3
    assert decoded.raw_output is True


def test_decoded_request_carries_model_id_version_and_deadline() -> None:
    decoded = decode(raw_request())
    assert (decoded.model, decoded.id, decoded.version, decoded.deadline) == (
        "churn",
        "req-1",
        "3",
        12.5,
    )


def test_typed_input_decodes_contents_to_the_model_dtype() -> None:
    x = features(2)
    decoded = decode(typed_request(x))
    array = decoded.inputs["input"]
    assert array.dtype == np.float32
    assert array.shape == (2, 15)
    np.testing.assert_array_equal(array, x)
    assert decoded.rows == 2
    assert decoded.raw_output is False


def test_requested_outputs_are_kept_in_the_asked_order() -> None:
    decoded = decode(raw_request(outputs=("probabilities", "label")))
    assert decoded.outputs == ("probabilities", "label")


def test_no_requested_outputs_means_every_output() -> None:
    assert decode(raw_request()).outputs is None


def test_raw_bytes_input_decodes_length_prefixed_elements() -> None:
    items = [b"alpha", b"", b"\x00\xffbinary"]
    request = pb.ModelInferRequest(
        model_name="echo",
        inputs=[Tensor(name="text", datatype="BYTES", shape=[3])],
        raw_input_contents=[length_prefixed(items)],
    )
    array = decode(request, BYTES_SIG).inputs["text"]
    assert array.dtype == np.object_
    assert array.shape == (3,)
    assert list(array) == items


def test_typed_bytes_input_decodes_bytes_contents() -> None:
    tensor = Tensor(name="text", datatype="BYTES", shape=[2])
    tensor.contents.bytes_contents.extend([b"a", b"bc"])
    array = decode(pb.ModelInferRequest(inputs=[tensor]), BYTES_SIG).inputs["text"]
    assert list(array) == [b"a", b"bc"]


def test_raw_fp16_input_decodes() -> None:
    x = np.array([[0.5, -1.0]], dtype=np.float16)
    request = pb.ModelInferRequest(
        inputs=[Tensor(name="half", datatype="FP16", shape=[1, 2])],
        raw_input_contents=[x.tobytes()],
    )
    array = decode(request, FP16_SIG).inputs["half"]
    assert array.dtype == np.float16
    np.testing.assert_array_equal(array, x)


# ---- validation: each rejection has the right kind and names the field ----------------------


def _unknown_input(r: Any) -> None:
    r.inputs[0].name = "bogus"


def _no_inputs(r: Any) -> None:
    del r.inputs[:]
    del r.raw_input_contents[:]


def _wrong_datatype(r: Any) -> None:
    r.inputs[0].datatype = "FP64"


def _wrong_rank(r: Any) -> None:
    r.inputs[0].shape[:] = [30]


def _wrong_dimension(r: Any) -> None:
    r.inputs[0].shape[:] = [2, 14]


def _negative_dimension(r: Any) -> None:
    r.inputs[0].shape[:] = [-2, 15]


def _short_raw(r: Any) -> None:
    r.raw_input_contents[0] = r.raw_input_contents[0][:-4]


def _extra_raw(r: Any) -> None:
    r.raw_input_contents.append(b"")


def _raw_and_typed(r: Any) -> None:
    r.inputs[0].contents.fp32_contents.append(1.0)


def _duplicate_input(r: Any) -> None:
    r.inputs.append(Tensor(name="input", datatype="FP32", shape=[2, 15]))
    r.raw_input_contents.append(features().tobytes())


def _zero_rows(r: Any) -> None:
    r.inputs[0].shape[:] = [0, 15]
    r.raw_input_contents[0] = b""


def _too_many_rows(r: Any) -> None:
    r.inputs[0].shape[:] = [9, 15]
    r.raw_input_contents[0] = features(9).tobytes()


def _unknown_output(r: Any) -> None:
    r.outputs.append(Requested(name="nope"))


def _duplicate_output(r: Any) -> None:
    r.outputs.extend([Requested(name="label"), Requested(name="label")])


def _typed_count(r: Any) -> None:
    del r.raw_input_contents[:]
    r.inputs[0].contents.fp32_contents.extend([1.0] * 29)


def _typed_wrong_field(r: Any) -> None:
    del r.raw_input_contents[:]
    r.inputs[0].contents.int_contents.extend([1] * 30)


@pytest.mark.parametrize(
    ("mutate", "fragments"),
    [
        (_unknown_input, ["'bogus'"]),
        (_no_inputs, ["missing input 'input'"]),
        (_wrong_datatype, ["'input'", "FP64", "FP32"]),
        (_wrong_rank, ["'input'", "rank"]),
        (_wrong_dimension, ["'input'", "dimension 1 must be 15"]),
        (_negative_dimension, ["'input'", "negative"]),
        (_short_raw, ["'input'", "raw_input_contents"]),
        (_extra_raw, ["raw_input_contents"]),
        (_raw_and_typed, ["'input'", "raw_input_contents", "typed contents"]),
        (_duplicate_input, ["'input'", "more than once"]),
        (_zero_rows, ["zero rows"]),
        (_too_many_rows, ["9 rows", "max_batch_size"]),
        (_unknown_output, ["'nope'"]),
        (_duplicate_output, ["'label'", "more than once"]),
        (_typed_count, ["'input'", "contents.fp32_contents"]),
        (_typed_wrong_field, ["'input'", "int_contents", "fp32_contents"]),
    ],
    ids=lambda v: v.__name__.strip("_") if callable(v) else None,
)
def test_malformed_request_is_invalid_argument_naming_the_field(
    mutate: Callable[[Any], None], fragments: list[str]
) -> None:
    request = raw_request()
    mutate(request)
    with pytest.raises(InvalidArgument) as info:
        decode(request)
    for fragment in fragments:
        assert fragment in info.value.message


def test_tensor_over_the_element_limit_is_resource_exhausted_naming_the_limit() -> None:
    with pytest.raises(ResourceExhausted) as info:
        decode(raw_request(features(8)), limits=Limits(max_batch_size=64, max_elements=100))
    assert "'input'" in info.value.message
    assert "max_tensor_elements" in info.value.message


def test_element_limit_is_checked_before_the_payload_is_read() -> None:
    """A huge declared shape is refused by its size alone (no need to send the bytes)."""
    request = raw_request()
    request.inputs[0].shape[:] = [10**9, 15]
    with pytest.raises(ResourceExhausted, match="max_tensor_elements"):
        decode(request)


def test_typed_value_that_overflows_int8_is_invalid_argument() -> None:
    tensor = Tensor(name="small", datatype="INT8", shape=[1, 2])
    tensor.contents.int_contents.extend([1, 300])
    with pytest.raises(InvalidArgument) as info:
        decode(pb.ModelInferRequest(inputs=[tensor]), INT8_SIG)
    assert "'small'" in info.value.message
    assert "INT8" in info.value.message


def test_typed_int8_in_range_decodes() -> None:
    tensor = Tensor(name="small", datatype="INT8", shape=[1, 2])
    tensor.contents.int_contents.extend([-128, 127])
    array = decode(pb.ModelInferRequest(inputs=[tensor]), INT8_SIG).inputs["small"]
    assert array.dtype == np.int8
    np.testing.assert_array_equal(array, [[-128, 127]])


def test_typed_fp16_input_is_refused_naming_raw_input_contents() -> None:
    tensor = Tensor(name="half", datatype="FP16", shape=[1, 2])
    tensor.contents.fp32_contents.extend([0.5, 1.0])
    with pytest.raises(InvalidArgument, match="raw_input_contents"):
        decode(pb.ModelInferRequest(inputs=[tensor]), FP16_SIG)


def test_repeated_raw_bytes_requests_take_the_cached_plan_and_still_validate() -> None:
    """Entity ids arrive as one raw BYTES tensor per request: after the first full decode, the
    cached plan decodes the next ones, and a malformed one is still refused naming the input."""
    limits = Limits(max_batch_size=8, max_elements=1000)

    def request(raw: bytes) -> Any:
        return pb.ModelInferRequest(
            inputs=[Tensor(name="text", datatype="BYTES", shape=[2])], raw_input_contents=[raw]
        )

    first = decode(request(length_prefixed([b"c1", b"c22"])), BYTES_SIG, limits)
    assert limits.plans  # the plan was learned
    again = decode(request(length_prefixed([b"c333", b""])), BYTES_SIG, limits)
    assert list(first.inputs["text"]) == [b"c1", b"c22"]
    assert list(again.inputs["text"]) == [b"c333", b""]
    assert again.raw_output is True
    assert again.rows == 2
    with pytest.raises(InvalidArgument, match=r"'text'.*holds 1 BYTES elements"):
        decode(request(length_prefixed([b"only-one"])), BYTES_SIG, limits)


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        (b"\x05\x00", "truncated"),
        (struct.pack("<I", 10) + b"abc", "overruns"),
        (length_prefixed([b"a", b"b"]), "holds 2 BYTES elements"),
    ],
    ids=["truncated-length", "overrun", "wrong-count"],
)
def test_malformed_raw_bytes_input_is_invalid_argument(raw: bytes, fragment: str) -> None:
    request = pb.ModelInferRequest(
        inputs=[Tensor(name="text", datatype="BYTES", shape=[3])], raw_input_contents=[raw]
    )
    with pytest.raises(InvalidArgument) as info:
        decode(request, BYTES_SIG)
    assert fragment in info.value.message
    assert "'text'" in info.value.message


# ---- encoding -------------------------------------------------------------------------------


def _result(raw_output: bool, outputs: dict[str, np.ndarray] | None = None) -> InferResult:
    if outputs is None:
        outputs = {
            "label": np.array([1, 0], dtype=np.int64),
            "probabilities": np.array([[0.25, 0.75], [0.5, 0.5]], dtype=np.float32),
        }
    return InferResult(
        model="churn", version="3", id="req-1", outputs=outputs, raw_output=raw_output
    )


def test_raw_result_encodes_raw_output_contents_per_output() -> None:
    result = _result(raw_output=True)
    response = encode_result(result)
    assert (response.model_name, response.model_version, response.id) == ("churn", "3", "req-1")
    assert [(o.name, o.datatype, list(o.shape)) for o in response.outputs] == [
        ("label", "INT64", [2]),
        ("probabilities", "FP32", [2, 2]),
    ]
    assert list(response.raw_output_contents) == [a.tobytes() for a in result.outputs.values()]
    assert not any(o.HasField("contents") for o in response.outputs)


def test_typed_result_encodes_contents_and_no_raw_output() -> None:
    response = encode_result(_result(raw_output=False))
    assert len(response.raw_output_contents) == 0
    label, probabilities = response.outputs
    assert (label.name, label.datatype, list(label.shape)) == ("label", "INT64", [2])
    assert list(label.contents.int64_contents) == [1, 0]
    assert list(probabilities.contents.fp32_contents) == [0.25, 0.75, 0.5, 0.5]


@pytest.mark.parametrize("make_request", [raw_request, typed_request], ids=["raw", "typed"])
def test_response_form_mirrors_the_request_form(make_request: Callable[[], Any]) -> None:
    decoded = decode(make_request())
    response = encode_result(_result(raw_output=decoded.raw_output))
    uses_raw = len(response.raw_output_contents) > 0
    uses_typed = any(o.HasField("contents") for o in response.outputs)
    assert (uses_raw, uses_typed) == (decoded.raw_output, not decoded.raw_output)


def test_outputs_are_encoded_in_the_order_asked() -> None:
    decoded = decode(raw_request(outputs=("probabilities", "label")))
    full = _result(raw_output=True).outputs
    assert decoded.outputs is not None
    response = encode_result(_result(True, {name: full[name] for name in decoded.outputs}))
    assert [o.name for o in response.outputs] == ["probabilities", "label"]
    assert response.raw_output_contents[0] == full["probabilities"].tobytes()


def test_bytes_round_trip_through_the_raw_path() -> None:
    items = [b"alpha", b"", b"\x00\xffbinary"]
    raw = length_prefixed(items)
    request = pb.ModelInferRequest(
        inputs=[Tensor(name="text", datatype="BYTES", shape=[3])], raw_input_contents=[raw]
    )
    decoded = decode(request, BYTES_SIG)
    response = encode_result(
        InferResult(model="echo", version="1", id="", outputs={"echo": decoded.inputs["text"]})
    )
    assert response.outputs[0].datatype == "BYTES"
    assert list(response.outputs[0].shape) == [3]
    assert response.raw_output_contents[0] == raw


def test_bytes_output_encodes_typed_bytes_contents() -> None:
    array = np.empty(2, dtype=object)
    array[:] = [b"x", b"yz"]
    response = encode_result(
        InferResult(model="echo", version="1", id="", outputs={"echo": array}, raw_output=False)
    )
    assert list(response.outputs[0].contents.bytes_contents) == [b"x", b"yz"]


def test_fp16_output_for_a_typed_request_is_encoded() -> None:
    """FP16 has no typed field; the response must still be valid (all outputs raw)."""
    out = np.array([[0.5, 1.0]], dtype=np.float16)
    response = encode_result(
        InferResult(model="half", version="1", id="", outputs={"y": out}, raw_output=False)
    )
    assert response.outputs[0].datatype == "FP16"
    assert response.raw_output_contents[0] == out.tobytes()


def test_result_parameters_are_encoded_with_their_types() -> None:
    result = _result(raw_output=True)
    result.parameters = {"flag": True, "count": 3, "ratio": 0.5, "note": "canary"}
    params = encode_result(result).parameters
    assert params["flag"].bool_param is True
    assert params["count"].int64_param == 3
    assert params["ratio"].double_param == 0.5
    assert params["note"].string_param == "canary"
