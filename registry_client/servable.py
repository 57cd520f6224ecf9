"""Whether an ONNX file can be served, checked when it is registered rather than at start-up.

`prepare` reads a model as users export it and either hands back what to register or raises
RegistryError with one line naming the file, the tensor and what to do:

- ZipMap outputs (skl2onnx's default for classifiers: ``output_probability`` is a sequence of
  ``{class: probability}`` maps, which the Open Inference Protocol cannot carry) are unwrapped:
  the ZipMap node becomes an Identity, so ``output_probability`` is the FP32 ``[N, C]`` tensor
  ZipMap was fed (one column per class, in the class order ZipMap lists) and the labels stay as
  they are. With ``unwrap_zipmap=False`` they are refused, naming skl2onnx's option instead.
- Any other output that is not a tensor (a sequence, a map) is refused.
- Every input and output needs a variable first (batch) dimension, which is what the server
  batches along; a fixed one (``[1, 8]``) is refused with how to export a dynamic one. The
  check runs on the shapes onnxruntime reports, the ones the server checks at load time, so a
  file that passes here loads there.

`check_features` checks ``--features`` against the signature: one name per input column.

Needs the ``onnx`` package (the "train" extra) and onnxruntime; both are imported here only.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from registry_client.errors import RegistryError
from registry_client.types import Signature, TensorInfo

INSTALL_TRAIN = "pip install 'batchline[train]'"
ZIPMAP_OPTION = (
    "convert_sklearn(..., options={id(clf): {'zipmap': False}}) "
    "(to_onnx: options={'zipmap': False})"
)
_KINDS = {
    "sequence_type": "a sequence",
    "map_type": "a map",
    "optional_type": "an optional",
    "sparse_tensor_type": "a sparse tensor",
}


@dataclass(frozen=True)
class Prepared:
    """What to register: `path` (the file given, or its rewrite) and its signature; `notes`
    say what was changed (one line each) and `tags` record it on the version."""

    path: Path
    signature: Signature
    notes: tuple[str, ...] = ()
    tags: dict[str, str] = field(default_factory=dict)


def prepare(path: Path, work_dir: Path, *, unwrap_zipmap: bool = True) -> Prepared:
    """Check `path` and, if it has ZipMap outputs, write the unwrapped model into `work_dir`."""
    onnx = _import_onnx(path)
    if not path.is_file():
        raise RegistryError(f"{path} is not a file")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # onnx raises protobuf DecodeError and others for a bad file
        raise RegistryError(f"{path} is not a readable ONNX model: {exc}") from exc
    notes: list[str] = []
    tags: dict[str, str] = {}
    target = path
    zipmaps = _zipmap_outputs(model)
    if zipmaps and not unwrap_zipmap:
        names = ", ".join(repr(o) for o, _ in zipmaps)
        raise RegistryError(
            f"{path}: output {names} is a ZipMap (a list of {{class: probability}} maps), which "
            f"the Open Inference Protocol cannot carry: export without it, {ZIPMAP_OPTION}, or "
            "register without --no-zipmap-unwrap to have it unwrapped"
        )
    for output, node in zipmaps:
        classes = _unwrap(onnx, model, output, node)
        notes.append(
            f"output {output!r}: unwrapped skl2onnx's ZipMap into FP32 [-1, {len(classes)}], "
            f"one column per class in the order {', '.join(classes)} (to export it that way "
            f"yourself: {ZIPMAP_OPTION})"
        )
        tags[f"batchline.classes.{output}"] = ",".join(classes)
    if zipmaps:
        tags["batchline.unwrapped_zipmap"] = ",".join(o for o, _ in zipmaps)
        target = work_dir / "model.onnx"
        try:
            onnx.checker.check_model(model)
        except Exception as exc:  # pragma: no cover - a rewrite onnx itself refuses is a bug
            raise RegistryError(f"{path}: the unwrapped model fails onnx's checker: {exc}") from exc
        target.write_bytes(model.SerializeToString())
    for value in model.graph.output:
        kind = value.type.WhichOneof("value")
        if kind != "tensor_type":
            raise RegistryError(
                f"{path}: output {value.name!r} is {_KINDS.get(str(kind), 'not a tensor')}, not "
                "a tensor; the Open Inference Protocol carries tensors only: export it as one"
            )
    from registry_client.demo import onnx_signature

    signature = onnx_signature(target)
    _check_batch_dims(path, target)
    return Prepared(target, signature, tuple(notes), tags)


def check_features(features: Sequence[str], signature: Signature, path: Path) -> None:
    """`features` (from --features) must name every input column once, in order."""
    seen: set[str] = set()
    for name in features:
        if name in seen:
            raise RegistryError(f"--features: {name!r} appears twice")
        seen.add(name)
    if not features:
        return
    widths = [_width(t) for t in signature.inputs]
    if any(w is None for w in widths):
        return  # a variable feature dimension: nothing to count against
    width = sum(w for w in widths if w is not None)
    if len(features) != width:
        inputs = ", ".join(f"{t.name!r} {t.datatype} {_dims(t.shape)}" for t in signature.inputs)
        raise RegistryError(
            f"--features: {len(features)} name{'s' if len(features) != 1 else ''} "
            f"({', '.join(features)}) for {path}, whose input{'s' if len(widths) > 1 else ''} "
            f"{inputs} take{'' if len(widths) > 1 else 's'} {width} feature{'s' if width != 1 else ''}: "
            f"give {width} comma-separated names in column order, or leave --features out"
        )


# -- internals -------------------------------------------------------------------------------


def _import_onnx(path: Path) -> Any:
    try:
        import onnx
    except ImportError as exc:
        raise RegistryError(
            f"reading {path} needs the 'onnx' package: {INSTALL_TRAIN} ({exc})"
        ) from exc
    return onnx


def _zipmap_outputs(model: Any) -> list[tuple[str, Any]]:
    """(graph output name, ZipMap node) for each graph output a ZipMap node produces."""
    producers = {out: node for node in model.graph.node for out in node.output}
    found = []
    for value in model.graph.output:
        node = producers.get(value.name)
        if node is not None and node.op_type == "ZipMap" and node.domain == "ai.onnx.ml":
            found.append((value.name, node))
    return found


def _unwrap(onnx: Any, model: Any, output: str, node: Any) -> list[str]:
    """Replace a ZipMap node by an Identity of its [N, C] input; return the class labels."""
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    raw = attrs.get("classlabels_int64s") or attrs.get("classlabels_strings") or []
    classes = [c.decode() if isinstance(c, bytes) else str(c) for c in raw]
    graph = model.graph
    position = list(graph.node).index(node)
    identity = onnx.helper.make_node(
        "Identity", [node.input[0]], [output], name=f"{node.name or output}_unwrapped"
    )
    graph.node.remove(node)
    graph.node.insert(position, identity)
    tensor = onnx.helper.make_tensor_value_info(
        output, onnx.TensorProto.FLOAT, [None, len(classes) or None]
    )
    for i, value in enumerate(graph.output):
        if value.name == output:
            graph.output[i].CopyFrom(tensor)
    if not any(op.domain in ("", "ai.onnx") for op in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid("", 13))
    return classes


def _check_batch_dims(given: Path, path: Path) -> None:
    """Every input and output needs a variable first dimension, as onnxruntime reports them."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    try:
        session = ort.InferenceSession(
            str(path), sess_options=options, providers=["CPUExecutionProvider"]
        )
    except Exception as exc:  # onnxruntime raises its own exception types
        raise RegistryError(f"{given}: onnxruntime cannot load it: {exc}") from exc
    for kind, args in (("input", session.get_inputs()), ("output", session.get_outputs())):
        for arg in args:
            dims = [d if isinstance(d, int) and d >= 0 else -1 for d in (arg.shape or [])]
            if dims and dims[0] == -1:
                continue
            if not dims:
                problem = "has no dimensions (a scalar), so no first (batch) dimension"
            else:
                problem = f"has a fixed first dimension of {dims[0]} ({_dims(tuple(dims))})"
            example = _dims((-1, *dims[1:])) if dims else "[-1]"
            raise RegistryError(
                f"{given}: {kind} {arg.name!r} {problem}; batchline batches requests along "
                f"the first dimension, so every input and output needs it variable ({example}): "
                "export with a dynamic batch dimension (skl2onnx: FloatTensorType([None, ...]); "
                f"torch.onnx.export: dynamic_axes={{{arg.name!r}: {{0: 'batch'}}}})"
            )


def _width(tensor: TensorInfo) -> int | None:
    rest = tensor.shape[1:]
    if any(d < 0 for d in rest):
        return None
    return math.prod(rest)


def _dims(shape: tuple[int, ...]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def work_dir() -> tempfile.TemporaryDirectory[str]:
    """A scratch folder for a rewritten model (removed when the context exits)."""
    return tempfile.TemporaryDirectory(prefix="batchline-register-")
