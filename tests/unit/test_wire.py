"""The hand-encoded raw replies equal protobuf's own encoder, byte for byte (a property test)."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from server._proto import inference_pb2 as pb
from server.api.wire import RawResponseEncoder, stream_reply, varint
from server.types import InferResult

# V2 numeric datatypes and their numpy dtypes, written out from the KServe V2 spec's table
# (not taken from server.types, the table under test's neighbour).
_DATATYPES = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
}

_text = st.text(max_size=40)


@st.composite
def _outputs(draw: st.DrawFn) -> list[tuple[str, str, np.ndarray]]:
    names = draw(st.lists(_text, min_size=1, max_size=4, unique=True))
    out = []
    for name in names:
        datatype = draw(st.sampled_from(sorted(_DATATYPES)))
        shape = draw(hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5))
        array = draw(hnp.arrays(_DATATYPES[datatype], shape))
        out.append((name, datatype, array))
    return out


@settings(max_examples=300, deadline=None)
@given(model=_text, version=_text, request_id=_text, outputs=_outputs())
def test_raw_reply_bytes_equal_protobufs_serialisation(
    model: str, version: str, request_id: str, outputs: list[tuple[str, str, np.ndarray]]
) -> None:
    result = InferResult(
        model=model,
        version=version,
        id=request_id,
        outputs={name: array for name, _, array in outputs},
    )
    encoder = RawResponseEncoder()
    expected = pb.ModelInferResponse(model_name=model, model_version=version, id=request_id)
    for name, datatype, array in outputs:
        expected.outputs.add(name=name, datatype=datatype, shape=list(array.shape))
        expected.raw_output_contents.append(array.tobytes())
    want = expected.SerializeToString()
    assert encoder.encode(result) == want
    assert encoder.encode(result) == want  # again, from the cached header
    stream = pb.ModelStreamInferResponse(infer_response=expected).SerializeToString()
    assert stream_reply(want) == stream


@given(st.integers(min_value=-(2**63), max_value=2**63 - 1))
def test_varint_equals_protobufs_int64_encoding(value: int) -> None:
    # A one-dimension shape is a packed int64 field: tag 0x1A, length, the varint.
    tensor = pb.ModelInferResponse.InferOutputTensor(shape=[value]).SerializeToString()
    encoded = varint(value)
    assert tensor == b"\x1a" + bytes((len(encoded),)) + encoded
