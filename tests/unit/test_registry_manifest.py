"""The manifest helpers and the dependency-free reader of ONNX external data, checked against
models saved by the `onnx` package and against onnx's own view of the same files."""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from registry_client import ManifestError, RegistryError
from registry_client import manifest as manifest_module
from registry_client.manifest import (
    DigestCache,
    external_data_files,
    folder_files,
    manifest_digest,
    relative_path,
)


def _graph(name: str = "g") -> onnx.GraphProto:
    w = numpy_helper.from_array(np.arange(30, dtype=np.float32).reshape(15, 2), "W")
    b = numpy_helper.from_array(np.array([0.5, -0.5], dtype=np.float32), "B")
    return helper.make_graph(
        [helper.make_node("Gemm", ["input", "W", "B"], ["probabilities"])],
        name,
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [None, 15])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [None, 2])],
        [w, b],
    )


def _model(graph: onnx.GraphProto | None = None) -> onnx.ModelProto:
    return helper.make_model(graph or _graph(), opset_imports=[helper.make_opsetid("", 17)])


def _external(tensor: onnx.TensorProto, location: str, *, flag: bool = True) -> None:
    """Mark a tensor as stored in `location`, as onnx's external-data helper does."""
    tensor.ClearField("raw_data")
    tensor.ClearField("float_data")
    if flag:
        tensor.data_location = TensorProto.EXTERNAL
    entry = tensor.external_data.add()
    entry.key, entry.value = "location", location


def _onnx_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Every tensor of a model, walked with onnx's own classes (the independent oracle)."""

    def graph(g: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
        yield from g.initializer
        for sparse in g.sparse_initializer:
            yield sparse.values
            yield sparse.indices
        for node in g.node:
            yield from attributes(node.attribute)

    def attributes(attrs: list[onnx.AttributeProto]) -> Iterator[onnx.TensorProto]:
        for a in attrs:
            if a.HasField("t"):
                yield a.t
            yield from a.tensors
            if a.HasField("sparse_tensor"):
                yield a.sparse_tensor.values
                yield a.sparse_tensor.indices
            for s in a.sparse_tensors:
                yield s.values
                yield s.indices
            if a.HasField("g"):
                yield from graph(a.g)
            for sub in a.graphs:
                yield from graph(sub)

    yield from graph(model.graph)
    for info in model.training_info:
        yield from graph(info.initialization)
        yield from graph(info.algorithm)
    for function in model.functions:
        yield from attributes(list(function.attribute_proto))
        for node in function.node:
            yield from attributes(node.attribute)


def _onnx_locations(path: Path) -> tuple[str, ...]:
    model = onnx.load(str(path), load_external_data=False)
    found = {
        os.path.normpath(e.value)
        for t in _onnx_tensors(model)
        for e in t.external_data
        if e.key == "location"
    }
    return tuple(sorted(found))


# -- models saved by onnx -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"all_tensors_to_one_file": True, "location": "weights.bin"}, ("weights.bin",)),
        ({"all_tensors_to_one_file": False}, ("B", "W")),
        ({"all_tensors_to_one_file": True, "location": "data/w.bin"}, ("data/w.bin",)),
    ],
)
def test_external_data_saved_by_onnx_is_found(
    tmp_path: Path, kwargs: dict[str, object], expected: tuple[str, ...]
) -> None:
    (tmp_path / "data").mkdir()
    path = tmp_path / "model.onnx"
    onnx.save_model(_model(), path, save_as_external_data=True, size_threshold=0, **kwargs)  # type: ignore[arg-type]
    assert external_data_files(path) == expected
    assert external_data_files(path) == _onnx_locations(path)
    assert all((tmp_path / f).is_file() for f in expected)


def test_a_model_with_inline_weights_references_nothing(tmp_path: Path) -> None:
    path = tmp_path / "model.onnx"
    onnx.save_model(_model(), path)
    assert external_data_files(path) == ()
    assert _onnx_locations(path) == ()


def test_tensors_anywhere_in_the_model_are_found(tmp_path: Path) -> None:
    """Initializers of a subgraph, tensor attributes (Constant), sparse initializers, function
    bodies and training graphs: wherever a TensorProto can sit, its external data counts."""
    then_branch = _graph("then")
    _external(then_branch.initializer[0], "then.bin")
    else_branch = _graph("else")
    constant = numpy_helper.from_array(np.ones(2, dtype=np.float32), "c")
    _external(constant, "sub/constant.bin")
    cond = numpy_helper.from_array(np.array(True), "cond")
    main = _graph("main")
    main.initializer.append(cond)
    main.node.append(
        helper.make_node(
            "If", ["cond"], ["unused"], then_branch=then_branch, else_branch=else_branch
        )
    )
    main.node.append(helper.make_node("Constant", [], ["k"], value=constant))
    sparse_values = numpy_helper.from_array(np.ones(2, dtype=np.float32), "sv")
    _external(sparse_values, "sparse.bin")
    sparse_indices = numpy_helper.from_array(np.array([0, 3], dtype=np.int64), "si")
    main.sparse_initializer.append(helper.make_sparse_tensor(sparse_values, sparse_indices, [4]))
    model = _model(main)
    fn_constant = numpy_helper.from_array(np.ones(1, dtype=np.float32), "fc")
    _external(fn_constant, "function.bin")
    model.functions.append(
        helper.make_function(
            "custom",
            "Fn",
            ["x"],
            ["y"],
            [helper.make_node("Constant", [], ["y"], value=fn_constant)],
            [helper.make_opsetid("", 17)],
        )
    )
    training = onnx.TrainingInfoProto()
    training.initialization.CopyFrom(_graph("init"))
    _external(training.initialization.initializer[1], "./init//b.bin")
    model.training_info.append(training)
    path = tmp_path / "model.onnx"
    path.write_bytes(model.SerializeToString())

    expected = ("function.bin", "init/b.bin", "sparse.bin", "sub/constant.bin", "then.bin")
    assert external_data_files(path) == expected
    assert external_data_files(path) == _onnx_locations(path)


def test_a_location_without_the_external_flag_still_counts(tmp_path: Path) -> None:
    """A superset of what ONNX Runtime would read: a stale location is still a file to vouch
    for, never one to skip."""
    model = _model()
    _external(model.graph.initializer[0], "stale.bin", flag=False)
    path = tmp_path / "model.onnx"
    path.write_bytes(model.SerializeToString())
    assert external_data_files(path) == ("stale.bin",)


def test_an_external_tensor_without_a_location_is_refused_naming_it(tmp_path: Path) -> None:
    model = _model()
    tensor = model.graph.initializer[0]
    tensor.ClearField("float_data")
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    path = tmp_path / "model.onnx"
    path.write_bytes(model.SerializeToString())
    with pytest.raises(
        ManifestError, match="tensor 'W' is stored externally but names no location"
    ):
        external_data_files(path)


@pytest.mark.parametrize(
    ("location", "reason"),
    [
        ("../weights.bin", "escapes the model's folder"),
        ("data/../../weights.bin", "escapes the model's folder"),
        ("/etc/passwd", "absolute path"),
        ("C:/weights.bin", "absolute path"),
        ("data\\weights.bin", "backslash"),
        (".weights.bin", "hidden"),
        ("data/.staging-x/w.bin", "hidden"),
        ("metadata.json", "reserved"),
        ("./model.onnx", "reserved"),
        ("w\n.bin", "control character"),
        ("", "empty"),
        ("./", "empty"),
        ("x" * 256, "longer than 255 bytes"),
    ],
)
def test_unsafe_locations_are_refused_naming_tensor_and_location(
    tmp_path: Path, location: str, reason: str
) -> None:
    model = _model()
    _external(model.graph.initializer[0], location)
    path = tmp_path / "model.onnx"
    path.write_bytes(model.SerializeToString())
    with pytest.raises(ManifestError, match=re.escape(reason)) as refused:
        external_data_files(path)
    assert "tensor 'W'" in str(refused.value)
    assert repr(location) in str(refused.value)


@pytest.mark.parametrize(
    ("location", "normalised"),
    [
        ("./w.bin", "w.bin"),
        ("a//b.bin", "a/b.bin"),
        ("a/./b.bin", "a/b.bin"),
        ("onnx::W_1", "onnx::W_1"),
    ],
)
def test_locations_are_normalised(location: str, normalised: str) -> None:
    assert relative_path(location, what="x") == normalised


# -- what is not an ONNX model ------------------------------------------------------------------


def test_unknown_fields_and_groups_are_skipped_as_protobuf_does(tmp_path: Path) -> None:
    model = _model()
    _external(model.graph.initializer[0], "weights.bin")
    # Field 99 as a group holding a varint and a nested group, then field 98 as fixed64.
    unknown = bytes([(99 << 3 | 3) & 0x7F | 0x80, 99 >> 4, 0x08, 0x01, 0x13, 0x14])
    unknown += bytes([(99 << 3 | 4) & 0x7F | 0x80, 99 >> 4])
    unknown += bytes([(98 << 3 | 1) & 0x7F | 0x80, 98 >> 4]) + b"\x00" * 8
    path = tmp_path / "model.onnx"
    data = model.SerializeToString() + unknown
    path.write_bytes(data)
    parsed = onnx.ModelProto()
    parsed.ParseFromString(data)  # protobuf accepts it
    assert parsed.graph.initializer[0].external_data[0].value == "weights.bin"
    assert external_data_files(path) == ("weights.bin",)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "empty"),
        (b"\xff\x00 not a protobuf", "not an ONNX model"),
        (b"\x08\x08", "no graph"),  # ir_version = 8 and nothing else
        (b"\x3a\x10\x0a", "runs past its message"),  # graph claims 16 bytes, has 1
        (b"\x08\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01", "varint longer than 10 bytes"),
        (b"\x0c", "unexpected wire type 4"),
        (b"\x0b" * 200 + b"\x0c" * 200, "nested deeper than 100"),
    ],
)
def test_what_is_not_an_onnx_model_is_refused_naming_the_file(
    tmp_path: Path, content: bytes, message: str
) -> None:
    path = tmp_path / "junk.onnx"
    path.write_bytes(content)
    with pytest.raises(RegistryError, match=re.escape(message)) as refused:
        external_data_files(path)
    assert str(path) in str(refused.value)


_VALID = _model().SerializeToString()


@settings(max_examples=300, deadline=None)
@given(st.integers(0, len(_VALID) - 1), st.binary(max_size=40))
def test_damaged_models_raise_a_registry_error_or_parse_never_crash(cut: int, tail: bytes) -> None:
    with tempfile.NamedTemporaryFile(suffix=".onnx") as f:
        f.write(_VALID[:cut] + tail)
        f.flush()
        with contextlib.suppress(RegistryError):
            external_data_files(Path(f.name))


# -- the manifest and the folder ------------------------------------------------------------------


def test_manifest_digest_is_the_sha256_of_the_sorted_sha256sum_listing() -> None:
    files = {"model.onnx": "a" * 64, "b/w.bin": "b" * 64, "attachment.json": "c" * 64}
    listing = f"{'c' * 64}  attachment.json\n{'b' * 64}  b/w.bin\n{'a' * 64}  model.onnx\n"
    assert manifest_digest(files) == hashlib.sha256(listing.encode()).hexdigest()
    assert manifest_digest(dict(reversed(list(files.items())))) == manifest_digest(files)


def test_folder_files_lists_nested_files_and_refuses_links(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    for name in ("model.onnx", "metadata.json", "sub/w.bin", ".hidden"):
        (tmp_path / name).write_bytes(b"x")
    assert folder_files(tmp_path) == [".hidden", "model.onnx", "sub/w.bin"]
    (tmp_path / "sub" / "link.bin").symlink_to(tmp_path / "model.onnx")
    with pytest.raises(ManifestError, match=r"link\.bin is a symbolic link"):
        folder_files(tmp_path)


def test_digest_cache_rehashes_a_file_rewritten_in_place_with_its_mtime_restored(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "weights.bin"
    path.write_bytes(b"\x00" * 4096)
    hashed: list[Path] = []
    real = manifest_module.sha256_file
    monkeypatch.setattr(manifest_module, "sha256_file", lambda p: hashed.append(p) or real(p))
    cache = DigestCache()
    first = cache.digest(path)
    assert cache.digest(path) == first
    assert len(hashed) == 1  # an unchanged file is not read again
    before = path.stat()
    with path.open("r+b") as f:
        f.write(b"\x01")
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert (path.stat().st_size, path.stat().st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    assert cache.digest(path) == hashlib.sha256(b"\x01" + b"\x00" * 4095).hexdigest()
    assert len(hashed) == 2
