"""Registries for tests: real ONNX models that misbehave on purpose, registered into a copy of
the demo registry; versions whose files are not what was registered; attachments replaced."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from registry_client import FileRegistry, ModelVersion, Registry, Signature, TensorInfo

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


# ---- versions whose files are not what was registered ----------------------------------------


def with_external_data(model: Path, folder: Path, location: str = "weights.bin") -> Path:
    """`model` saved again by onnx into `folder`, its weights (every initializer of 1 KiB or
    more) moved into `location`."""
    import onnx
    from onnx import numpy_helper

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.onnx"
    proto = onnx.load(str(model))
    for tensor in proto.graph.initializer:
        # onnx moves only raw_data out; skl2onnx writes some weights as float_data.
        tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor), tensor.name))
    onnx.save_model(
        proto,
        path,
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=location,
        size_threshold=1024,  # shape tensors stay inline: ORT's shape inference reads them
    )
    return path


def register_with_external_data(
    store: FileRegistry, name: str, version: str, workdir: Path
) -> ModelVersion:
    """`name`@`version` registered again as the next version, its weights in weights.bin and
    its attachments the same files."""
    mv = store.get_version(name, version)
    attachments = {
        f: store.attachment(name, version, f)
        for f in mv.files
        if f != "model.onnx" and f not in mv.external_data
    }
    return store.register(
        name,
        with_external_data(store.fetch(mv), workdir / f"{name}-{version}-external"),
        signature=mv.signature,
        features=mv.features,
        source="external data",
        attachments=attachments,
    )


def tamper_in_place(path: Path) -> None:
    """Flip the sign of the last 1024 float32s in `path`: same size, same mtime, other weights."""
    before = path.stat()
    data = bytearray(path.read_bytes())
    for i in range(len(data) - 1, max(len(data) - 4096, 0) - 1, -4):
        data[i] ^= 0x80
    path.write_bytes(bytes(data))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))


def register_again(
    registry: Registry, name: str, mv: ModelVersion, artifact: Path, **extra: Any
) -> ModelVersion:
    """Register `artifact` under `name` with `mv`'s metadata (signature, metrics, tags,
    features, source, description); `extra` adds keyword arguments (attachments=...)."""
    return registry.register(
        name,
        artifact,
        signature=mv.signature,
        metrics=mv.metrics,
        tags=mv.tags,
        features=mv.features,
        source=mv.source,
        description=mv.description,
        **extra,
    )


def register_with_attachment(root: Path, name: str, version: str, filename: str, text: str) -> None:
    """Make `name`@`version` in the registry at `root` a version registered with `text` as its
    attachment `filename` (the same model and other files). Editing the file in place would be
    tampering, which the registry refuses: the version is registered afresh in a scratch
    registry and its folder (files and manifest) takes the old one's place."""
    store = FileRegistry(root)
    mv = store.get_version(name, version)
    folder = Path(mv.artifact).parent
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / filename
        source.write_text(text)
        attachments = {
            f: store.attachment(name, version, f)
            for f in mv.files
            if f not in {"model.onnx", *mv.external_data}
        }
        new = register_again(
            FileRegistry(Path(tmp) / "scratch"),
            name,
            mv,
            store.fetch(mv),
            attachments={**attachments, filename: source},
        )
        shutil.rmtree(folder)
        shutil.move(Path(new.artifact).parent, folder)
