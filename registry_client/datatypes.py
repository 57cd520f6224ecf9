"""The one table of tensor datatypes: a KServe V2 name and what every other system calls it.

Every mapping the project needs is derived from `DATATYPES`: numpy dtypes (server codec, load
generator), ONNX element types (reading a graph), ONNX Runtime's type strings (a loaded
session), the V2 typed-contents field (`InferTensorContents`), and Triton's ModelConfig
DataType. A leaf module (numpy only) so the server, the registry and the load generator can all
import it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, slots=True)
class Datatype:
    name: str  # KServe V2 / Triton datatype name
    numpy: np.dtype[np.generic] | None  # None: no numpy dtype (BF16)
    onnx: int  # onnx.TensorProto element type
    ort: str | None  # onnxruntime's NodeArg.type (None: ORT has no Python type for it)
    contents: str | None  # InferTensorContents field; None: raw contents only
    config: str  # Triton model_config.proto DataType enum name


DATATYPES: tuple[Datatype, ...] = (
    Datatype("BOOL", np.dtype(np.bool_), 9, "tensor(bool)", "bool_contents", "TYPE_BOOL"),
    Datatype("UINT8", np.dtype(np.uint8), 2, "tensor(uint8)", "uint_contents", "TYPE_UINT8"),
    Datatype("UINT16", np.dtype(np.uint16), 4, "tensor(uint16)", "uint_contents", "TYPE_UINT16"),
    Datatype("UINT32", np.dtype(np.uint32), 12, "tensor(uint32)", "uint_contents", "TYPE_UINT32"),
    Datatype("UINT64", np.dtype(np.uint64), 13, "tensor(uint64)", "uint64_contents", "TYPE_UINT64"),
    Datatype("INT8", np.dtype(np.int8), 3, "tensor(int8)", "int_contents", "TYPE_INT8"),
    Datatype("INT16", np.dtype(np.int16), 5, "tensor(int16)", "int_contents", "TYPE_INT16"),
    Datatype("INT32", np.dtype(np.int32), 6, "tensor(int32)", "int_contents", "TYPE_INT32"),
    Datatype("INT64", np.dtype(np.int64), 7, "tensor(int64)", "int64_contents", "TYPE_INT64"),
    Datatype("FP16", np.dtype(np.float16), 10, "tensor(float16)", None, "TYPE_FP16"),
    Datatype("FP32", np.dtype(np.float32), 1, "tensor(float)", "fp32_contents", "TYPE_FP32"),
    Datatype("FP64", np.dtype(np.float64), 11, "tensor(double)", "fp64_contents", "TYPE_FP64"),
    Datatype("BF16", None, 16, None, None, "TYPE_BF16"),
    # BYTES travels as a numpy object array of bytes.
    Datatype("BYTES", np.dtype(np.object_), 8, "tensor(string)", "bytes_contents", "TYPE_STRING"),
)

BY_NAME: dict[str, Datatype] = {d.name: d for d in DATATYPES}
V2_NAMES: frozenset[str] = frozenset(BY_NAME)
V2_TO_NUMPY: dict[str, np.dtype[np.generic]] = {
    d.name: d.numpy for d in DATATYPES if d.numpy is not None
}
NUMPY_TO_V2: dict[np.dtype[np.generic], str] = {v: k for k, v in V2_TO_NUMPY.items()}
ONNX_TO_V2: dict[int, str] = {d.onnx: d.name for d in DATATYPES}
ORT_TO_V2: dict[str, str] = {d.ort: d.name for d in DATATYPES if d.ort is not None}
TYPED_FIELD: dict[str, str] = {d.name: d.contents for d in DATATYPES if d.contents is not None}
CONFIG_TYPES: dict[str, str] = {d.name: d.config for d in DATATYPES}
