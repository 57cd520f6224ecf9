"""The one datatype table, checked against the sources it restates: onnx's own element-type
mapping, the protocol's typed-contents fields and Triton's DataType enum."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from registry_client.datatypes import DATATYPES, ONNX_TO_V2, TYPED_FIELD, Datatype
from server._proto import inference_pb2 as pb

# Where onnx's enum spells a type differently from V2.
ONNX_SPELLING = {"FP16": "FLOAT16", "FP32": "FLOAT", "FP64": "DOUBLE", "BF16": "BFLOAT16",
                 "BYTES": "STRING"}  # fmt: skip


@pytest.mark.parametrize("row", DATATYPES, ids=lambda d: d.name)
def test_each_row_agrees_with_onnx_and_the_protocol(row: Datatype) -> None:
    assert onnx.TensorProto.DataType.Name(row.onnx) == ONNX_SPELLING.get(row.name, row.name)
    if row.numpy is not None and row.name != "BYTES":
        assert np.dtype(onnx.helper.tensor_dtype_to_np_dtype(row.onnx)) == row.numpy
    assert pb.DataType.Value(row.config) > 0  # the enum has it
    if row.contents is not None:
        assert row.contents in pb.InferTensorContents.DESCRIPTOR.fields_by_name


def test_the_derived_maps_cover_the_table() -> None:
    assert set(ONNX_TO_V2.values()) == {d.name for d in DATATYPES}
    # FP16 and BF16 have no typed field in the protocol: raw contents only.
    assert set(TYPED_FIELD) == {d.name for d in DATATYPES} - {"FP16", "BF16"}
