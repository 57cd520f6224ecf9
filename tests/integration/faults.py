"""Real ONNX models that misbehave on purpose, registered into a copy of the demo registry."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from registry_client import FileRegistry, Signature, TensorInfo

SIGNATURE = Signature(
    inputs=(TensorInfo("input", "FP32", (-1, 15)),),
    outputs=(TensorInfo("label", "INT64", (-1,)), TensorInfo("probabilities", "FP32", (-1, 2))),
)
POISON = 500.0  # a row whose first feature is >= 100 makes the model fail


def failing_model(path: Path) -> Path:
    """Same signature as churn; onnxruntime raises for any batch holding a row with x0 >= 100
    (a Gather index out of bounds), and answers sigmoid(sum(x)) otherwise."""
    import onnx
    from onnx import TensorProto, helper

    nodes = [
        helper.make_node("Slice", ["input", "zero", "one", "one"], ["first"]),
        helper.make_node("Div", ["first", "hundred"], ["scaled"]),
        helper.make_node("Floor", ["scaled"], ["floored"]),
        helper.make_node("Cast", ["floored"], ["index2d"], to=TensorProto.INT64),
        helper.make_node("Reshape", ["index2d", "flat"], ["index"]),
        helper.make_node("Gather", ["table", "index"], ["picked"], axis=0),
        helper.make_node("Unsqueeze", ["picked", "one"], ["picked2d"]),
        helper.make_node("ReduceSum", ["input", "one"], ["total"], keepdims=1),
        helper.make_node("Add", ["total", "picked2d"], ["logit"]),
        helper.make_node("Sigmoid", ["logit"], ["p1"]),
        helper.make_node("Sub", ["onef", "p1"], ["p0"]),
        helper.make_node("Concat", ["p0", "p1"], ["probabilities"], axis=1),
        helper.make_node("Greater", ["p1", "half"], ["positive"]),
        helper.make_node("Cast", ["positive"], ["label2d"], to=TensorProto.INT64),
        helper.make_node("Reshape", ["label2d", "flat"], ["label"]),
    ]
    init = [
        helper.make_tensor("zero", TensorProto.INT64, [1], [0]),
        helper.make_tensor("one", TensorProto.INT64, [1], [1]),
        helper.make_tensor("flat", TensorProto.INT64, [1], [-1]),
        helper.make_tensor("hundred", TensorProto.FLOAT, [], [100.0]),
        helper.make_tensor("table", TensorProto.FLOAT, [1], [0.0]),
        helper.make_tensor("onef", TensorProto.FLOAT, [], [1.0]),
        helper.make_tensor("half", TensorProto.FLOAT, [], [0.5]),
    ]
    graph = helper.make_graph(
        nodes,
        "failing",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 15])],
        [
            helper.make_tensor_value_info("label", TensorProto.INT64, ["N"]),
            helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", 2]),
        ],
        init,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.write_bytes(model.SerializeToString())
    return path


def registry_with_failing_churn(demo_registry: Path, workdir: Path) -> tuple[Path, str]:
    """A copy of the demo registry whose churn@production is the failing model; returns the
    registry root and the failing version (version 1 stays the good GBM)."""
    root = workdir / "registry"
    shutil.copytree(demo_registry, root)
    store = FileRegistry(root)
    mv = store.register(
        "churn", failing_model(workdir / "failing.onnx"), signature=SIGNATURE, source="faults"
    )
    store.set_alias("churn", "production", mv.version)
    return root, mv.version


def rows(n: int, poison: bool) -> np.ndarray:
    x = np.full((n, 15), 0.01, dtype=np.float32)
    if poison:
        x[:, 0] = POISON
    return x
