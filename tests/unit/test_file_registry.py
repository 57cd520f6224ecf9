"""FileRegistry and model references, against a real folder and real ONNX files."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from registry_client import (
    AliasNotFound,
    AttachmentNotFound,
    ChecksumMismatch,
    FileRegistry,
    InvalidName,
    InvalidReference,
    ManifestError,
    ModelNotFound,
    ModelRef,
    ModelVersion,
    Registry,
    RegistryError,
    Signature,
    TensorInfo,
    VersionNotFound,
    parse_ref,
)

SIG = Signature(
    inputs=(TensorInfo("input", "FP32", (-1, 3)),),
    outputs=(TensorInfo("label", "INT64", (-1,)), TensorInfo("probabilities", "FP32", (-1, 2))),
)


def _tiny_model() -> bytes:
    """A real ONNX model (the registry reads its graph for external data), weights inline."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weights = numpy_helper.from_array(np.arange(6, dtype=np.float32).reshape(3, 2), "W")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["input", "W"], ["probabilities"])],
        "tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [None, 3])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [None, 2])],
        [weights],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model.SerializeToString()


PAYLOAD = _tiny_model()
ESCAPING_NAMES = ["../x", "a/b", "..", ".", "", "/etc", ".hidden", "a\\b", "x\x00y", "ü"]


@pytest.fixture
def registry(tmp_path: Path) -> FileRegistry:
    return FileRegistry(tmp_path / "registry")


@pytest.fixture
def artifact(tmp_path: Path) -> Path:
    path = tmp_path / "model.onnx"
    path.write_bytes(PAYLOAD)
    return path


def register(registry: FileRegistry, artifact: Path, name: str = "churn") -> ModelVersion:
    return registry.register(
        name,
        artifact,
        signature=SIG,
        metrics={"accuracy": 0.9},
        tags={"algorithm": "dummy"},
        features=("f0", "f1", "f2"),
        source="unit test",
    )


def _register_in_child(
    root: str, artifact: str, worker: int, count: int, barrier: Any, results: Any
) -> None:
    try:
        registry = FileRegistry(root)
        barrier.wait()
        versions = []
        for _ in range(count):
            mv = register(registry, Path(artifact))
            registry.set_alias("churn", "production", mv.version)
            registry.set_alias("churn", f"w{worker}", mv.version)
            versions.append(mv.version)
        results.put((worker, versions))
    except BaseException as exc:
        results.put((worker, repr(exc)))


# -- references ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ref", "expected"),
    [
        ("churn", ModelRef("churn", alias="production")),
        ("churn@production", ModelRef("churn", alias="production")),
        ("churn@Production", ModelRef("churn", alias="production")),
        ("churn@3", ModelRef("churn", version="3")),
        ("churn@007", ModelRef("churn", version="7")),
        ("churn_mlp.v2-x@canary_2", ModelRef("churn_mlp.v2-x", alias="canary_2")),
    ],
)
def test_parse_ref_reads_name_alias_or_version(ref: str, expected: ModelRef) -> None:
    assert parse_ref(ref) == expected


@pytest.mark.parametrize(
    ("ref", "error", "named"),
    [
        ("", InvalidReference, "''"),
        ("churn@", InvalidReference, "'churn@'"),
        ("churn@a@b", InvalidReference, "'churn@a@b'"),
        ("churn@0", InvalidName, "'0'"),
        ("../x@production", InvalidName, "'../x'"),
        ("churn@../prod", InvalidName, "'../prod'"),
        ("@production", InvalidName, "''"),
    ],
)
def test_parse_ref_rejects_bad_refs_naming_the_bad_part(
    ref: str, error: type[RegistryError], named: str
) -> None:
    with pytest.raises(error, match=re.escape(named)):
        parse_ref(ref)


@given(st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}", fullmatch=True))
def test_any_valid_name_parses_to_itself_at_production(name: str) -> None:
    assert parse_ref(name) == ModelRef(name, alias="production")


@given(st.text(), st.text())
def test_a_name_containing_a_slash_is_never_accepted(left: str, right: str) -> None:
    with pytest.raises(RegistryError):
        parse_ref(f"{left}/{right}")


def test_model_version_round_trips_through_its_dict(registry: FileRegistry, artifact: Path) -> None:
    mv = register(registry, artifact)
    assert ModelVersion.from_dict(json.loads(json.dumps(mv.to_dict()))) == mv


# -- register and resolve -------------------------------------------------------------------------


def test_file_registry_satisfies_the_registry_protocol(registry: FileRegistry) -> None:
    typed: Registry = registry
    assert isinstance(typed, Registry)


def test_register_numbers_versions_one_two_three(registry: FileRegistry, artifact: Path) -> None:
    assert [register(registry, artifact).version for _ in range(3)] == ["1", "2", "3"]
    assert [mv.version for mv in registry.list_versions("churn")] == ["1", "2", "3"]


def test_version_numbers_are_per_model(registry: FileRegistry, artifact: Path) -> None:
    register(registry, artifact, "churn")
    register(registry, artifact, "churn")
    assert register(registry, artifact, "fraud").version == "1"
    assert registry.list_models() == ["churn", "fraud"]


def test_register_copies_the_artifact_and_records_its_sha256(
    registry: FileRegistry, artifact: Path
) -> None:
    mv = register(registry, artifact)
    artifact.write_bytes(b"changed after registration")
    stored = Path(mv.artifact)
    assert stored.is_relative_to(registry.root)
    assert mv.sha256 == hashlib.sha256(PAYLOAD).hexdigest()
    assert stored.read_bytes() == PAYLOAD


def test_register_records_created_as_utc_iso_8601(registry: FileRegistry, artifact: Path) -> None:
    created = datetime.fromisoformat(register(registry, artifact).created)
    assert created.utcoffset() == UTC.utcoffset(None)


def test_metadata_read_back_equals_what_register_returned(
    registry: FileRegistry, artifact: Path
) -> None:
    mv = register(registry, artifact)
    assert FileRegistry(registry.root).get_version("churn", "1") == mv


def test_resolve_by_alias_returns_the_aliased_version(
    registry: FileRegistry, artifact: Path
) -> None:
    register(registry, artifact)
    register(registry, artifact)
    registry.set_alias("churn", "canary", "2")
    assert registry.resolve("churn@canary").version == "2"


def test_resolve_by_version_number(registry: FileRegistry, artifact: Path) -> None:
    register(registry, artifact)
    register(registry, artifact)
    assert registry.resolve("churn@1").version == "1"
    assert registry.resolve(ModelRef("churn", version="2")).version == "2"


def test_resolve_bare_name_follows_production(registry: FileRegistry, artifact: Path) -> None:
    register(registry, artifact)
    register(registry, artifact)
    registry.set_alias("churn", "production", "2")
    assert registry.resolve("churn").version == "2"


def test_aliases_are_case_insensitive(registry: FileRegistry, artifact: Path) -> None:
    register(registry, artifact)
    registry.set_alias("churn", "Production", "1")
    assert registry.aliases("churn") == {"production": "1"}
    assert registry.resolve("churn@PRODUCTION").version == "1"


# -- fetch and checksums --------------------------------------------------------------------------


def test_fetch_returns_the_local_verified_artifact(registry: FileRegistry, artifact: Path) -> None:
    mv = register(registry, artifact)
    assert registry.fetch(mv).read_bytes() == PAYLOAD


def test_fetch_refuses_corrupted_bytes_naming_path_and_both_digests(
    registry: FileRegistry, artifact: Path
) -> None:
    mv = register(registry, artifact)
    stored = Path(mv.artifact)
    corrupted = bytearray(stored.read_bytes())
    corrupted[10] ^= 0xFF
    stored.write_bytes(corrupted)
    with pytest.raises(ChecksumMismatch) as caught:
        registry.fetch(mv)
    message = str(caught.value)
    assert str(stored) in message
    assert mv.sha256 in message
    assert hashlib.sha256(corrupted).hexdigest() in message


def test_fetch_rechecks_a_file_replaced_after_it_was_verified(
    registry: FileRegistry, artifact: Path, tmp_path: Path
) -> None:
    mv = register(registry, artifact)
    registry.fetch(mv)
    replacement = tmp_path / "evil.onnx"
    replacement.write_bytes(PAYLOAD[::-1])
    os.replace(replacement, mv.artifact)
    with pytest.raises(ChecksumMismatch):
        registry.fetch(mv)


def test_fetch_of_a_missing_artifact_names_its_path(registry: FileRegistry, artifact: Path) -> None:
    mv = register(registry, artifact)
    Path(mv.artifact).unlink()
    with pytest.raises(RegistryError, match=r"model\.onnx"):
        registry.fetch(mv)


# -- unknown things and unsafe names --------------------------------------------------------------


def test_unknown_model_error_names_the_model(registry: FileRegistry) -> None:
    with pytest.raises(ModelNotFound, match="'nosuch'"):
        registry.resolve("nosuch@production")


def test_unknown_version_error_names_model_and_version(
    registry: FileRegistry, artifact: Path
) -> None:
    register(registry, artifact)
    with pytest.raises(VersionNotFound, match=r"'churn' has no version '9' \(registered: 1\)"):
        registry.resolve("churn@9")


def test_unknown_alias_error_names_model_and_alias(registry: FileRegistry, artifact: Path) -> None:
    register(registry, artifact)
    registry.set_alias("churn", "production", "1")
    with pytest.raises(
        AliasNotFound, match=r"'churn' has no alias 'staging' \(aliases: production"
    ):
        registry.resolve("churn@staging")


def test_set_alias_to_a_missing_version_raises_version_not_found(
    registry: FileRegistry, artifact: Path
) -> None:
    register(registry, artifact)
    with pytest.raises(VersionNotFound, match="'5'"):
        registry.set_alias("churn", "production", "5")
    assert registry.aliases("churn") == {}


@pytest.mark.parametrize("name", ESCAPING_NAMES)
def test_names_that_could_escape_the_root_are_refused_everywhere(
    registry: FileRegistry, artifact: Path, name: str
) -> None:
    register(registry, artifact)
    with pytest.raises(InvalidName, match=re.escape(repr(name))):
        register(registry, artifact, name)
    for call in (
        lambda: registry.get_version(name, "1"),
        lambda: registry.list_versions(name),
        lambda: registry.aliases(name),
        lambda: registry.set_alias("churn", name, "1"),
    ):
        with pytest.raises(InvalidName):
            call()
    assert sorted(p.name for p in registry.root.iterdir()) == ["churn"]


def test_a_model_folder_symlinked_outside_the_root_is_refused(
    registry: FileRegistry, artifact: Path, tmp_path: Path
) -> None:
    outside = FileRegistry(tmp_path / "elsewhere")
    register(outside, artifact, "secret")
    registry.root.mkdir(parents=True)
    (registry.root / "secret").symlink_to(outside.root / "secret")
    with pytest.raises(InvalidName, match="outside the registry root"):
        registry.resolve("secret@1")


# -- aliases over time ----------------------------------------------------------------------------


def test_moving_an_alias_keeps_its_history_so_it_can_roll_back(
    registry: FileRegistry, artifact: Path
) -> None:
    for _ in range(2):
        register(registry, artifact)
    registry.set_alias("churn", "production", "1")
    registry.set_alias("churn", "production", "2")
    history = registry.alias_history("churn", "production")
    assert [v for v, _ in history] == ["1", "2"]
    assert history[0][1] <= history[1][1]

    previous = history[-2][0]
    registry.set_alias("churn", "production", previous)
    assert registry.resolve("churn").version == "1"
    assert [v for v, _ in registry.alias_history("churn", "production")] == ["1", "2", "1"]


def test_setting_an_alias_to_its_current_version_adds_no_history(
    registry: FileRegistry, artifact: Path
) -> None:
    register(registry, artifact)
    registry.set_alias("churn", "production", "1")
    registry.set_alias("churn", "production", "1")
    assert len(registry.alias_history("churn", "production")) == 1


def test_history_of_an_alias_never_set_raises_alias_not_found(
    registry: FileRegistry, artifact: Path
) -> None:
    register(registry, artifact)
    with pytest.raises(AliasNotFound, match="'staging'"):
        registry.alias_history("churn", "staging")


# -- atomicity and concurrency --------------------------------------------------------------------


def test_writes_leave_no_temporary_files_behind(registry: FileRegistry, artifact: Path) -> None:
    registry.register("churn", artifact, signature=SIG, attachments={"reference.npz": artifact})
    register(registry, artifact)
    registry.set_alias("churn", "production", "1")
    registry.set_alias("churn", "production", "2")
    found = sorted(str(p.relative_to(registry.root)) for p in registry.root.rglob("*"))
    assert found == [
        "churn",
        "churn/.lock",
        "churn/1",
        "churn/1/metadata.json",
        "churn/1/model.onnx",
        "churn/1/reference.npz",
        "churn/2",
        "churn/2/metadata.json",
        "churn/2/model.onnx",
        "churn/aliases.json",
    ]


def test_concurrent_processes_get_distinct_versions_and_a_valid_alias_file(
    registry: FileRegistry, artifact: Path
) -> None:
    workers, each = 4, 5
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(workers)
    results = ctx.SimpleQueue()
    procs = [
        ctx.Process(
            target=_register_in_child,
            args=(str(registry.root), str(artifact), w, each, barrier, results),
        )
        for w in range(workers)
    ]
    for p in procs:
        p.start()
    outcomes = dict(results.get() for _ in procs)
    assert all(isinstance(v, list) for v in outcomes.values()), outcomes
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0

    versions = [v for w in range(workers) for v in outcomes[w]]
    assert sorted(versions, key=int) == [str(n) for n in range(1, workers * each + 1)]
    doc = json.loads((registry.root / "churn" / "aliases.json").read_text())
    assert len(doc["history"]) == 2 * workers * each
    assert {doc["aliases"][f"w{w}"] for w in range(workers)} == {
        outcomes[w][-1] for w in range(workers)
    }
    for mv in registry.list_versions("churn"):
        assert registry.fetch(mv).read_bytes() == PAYLOAD


# -- the manifest: every file of a version ------------------------------------------------------


WEIGHTS = np.arange(6, dtype=np.float32).reshape(3, 2)


def external_model(folder: Path, *, location: str | None = "weights.bin") -> Path:
    """The tiny model saved by onnx with its weights in `location` beside it (None: one file
    per tensor, named after the tensor)."""
    import onnx

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.onnx"
    onnx.save_model(
        onnx.load_from_string(PAYLOAD),
        path,
        save_as_external_data=True,
        all_tensors_to_one_file=location is not None,
        location=location,
        size_threshold=0,
    )
    return path


def model_with_location(path: Path, location: str) -> Path:
    """The tiny model with its weights marked as stored in `location` (which may be unsafe)."""
    import onnx

    model = onnx.load_from_string(PAYLOAD)
    tensor = model.graph.initializer[0]
    tensor.ClearField("raw_data")
    tensor.ClearField("float_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    entry = tensor.external_data.add()
    entry.key, entry.value = "location", location
    path.write_bytes(model.SerializeToString())
    return path


def run_model(path: Path) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {"input": np.ones((1, 3), dtype=np.float32)})
    return np.asarray(out)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def overwrite_same_size(path: Path) -> None:
    """Change a file's bytes, keep its size and mtime: the issue's silent weight swap."""
    before = path.stat()
    data = bytearray(path.read_bytes())
    data[-4:] = np.float32(1000.0).tobytes()
    path.write_bytes(bytes(data))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))


@pytest.fixture
def attached(tmp_path: Path) -> dict[str, Path]:
    view = tmp_path / "feature_view.json"
    view.write_text('{"name": "v"}\n')
    profile = tmp_path / "profile.json"
    profile.write_text('{"features": []}\n')
    return {"feature_view.json": view, "profile.json": profile}


def test_register_records_a_manifest_of_model_external_data_and_attachments(
    registry: FileRegistry, tmp_path: Path, attached: dict[str, Path]
) -> None:
    src = external_model(tmp_path / "src")
    mv = registry.register("churn", src, signature=SIG, attachments=attached)
    folder = Path(mv.artifact).parent
    expected = {
        "model.onnx": sha(src),
        "weights.bin": sha(src.parent / "weights.bin"),
        "feature_view.json": sha(attached["feature_view.json"]),
        "profile.json": sha(attached["profile.json"]),
    }
    assert mv.files == expected
    assert mv.external_data == ("weights.bin",)
    listing = "".join(f"{expected[f]}  {f}\n" for f in sorted(expected))
    assert mv.manifest_sha256 == hashlib.sha256(listing.encode()).hexdigest()
    metadata = json.loads((folder / "metadata.json").read_text())
    assert (metadata["schema"], metadata["files"]) == (2, expected)
    assert metadata["manifest_sha256"] == mv.manifest_sha256
    assert FileRegistry(registry.root).get_version("churn", "1") == mv
    # The external data was copied in: the registered model runs from the registry alone.
    (src.parent / "weights.bin").unlink()
    fetched = registry.fetch(mv)
    np.testing.assert_allclose(run_model(fetched), np.ones((1, 3)) @ WEIGHTS)


def test_the_manifest_digest_is_what_sha256sum_says(registry: FileRegistry, tmp_path: Path) -> None:
    import subprocess

    mv = registry.register("churn", external_model(tmp_path / "src"), signature=SIG)
    out = subprocess.run(
        "find . -type f ! -name metadata.json -printf '%P\\n' | LC_ALL=C sort "
        "| xargs sha256sum | sha256sum",
        shell=True,
        cwd=Path(mv.artifact).parent,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert out.split()[0] == mv.manifest_sha256


def test_register_copies_one_file_per_tensor_and_nested_locations(
    registry: FileRegistry, tmp_path: Path
) -> None:
    per_tensor = registry.register(
        "churn", external_model(tmp_path / "a", location=None), signature=SIG
    )
    assert per_tensor.external_data == ("W",)
    (tmp_path / "b" / "data").mkdir(parents=True)
    nested = registry.register(
        "churn", external_model(tmp_path / "b", location="data/w.bin"), signature=SIG
    )
    assert nested.external_data == ("data/w.bin",)
    assert (Path(nested.artifact).parent / "data" / "w.bin").is_file()
    for mv in (per_tensor, nested):
        np.testing.assert_allclose(run_model(registry.fetch(mv)), np.ones((1, 3)) @ WEIGHTS)


def test_register_refuses_missing_external_data_naming_it(
    registry: FileRegistry, tmp_path: Path
) -> None:
    src = external_model(tmp_path / "src")
    (src.parent / "weights.bin").unlink()
    with pytest.raises(ManifestError, match=r"references external data .*weights\.bin.*missing"):
        registry.register("churn", src, signature=SIG)
    assert not registry.root.joinpath("churn").exists() or registry.list_models() == []


@pytest.mark.parametrize(
    ("location", "reason"),
    [
        ("../outside.bin", "escapes"),
        ("/tmp/outside.bin", "absolute"),
        ("metadata.json", "reserved"),
    ],
)
def test_register_refuses_external_data_outside_the_folder(
    registry: FileRegistry, tmp_path: Path, location: str, reason: str
) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "outside.bin").write_bytes(WEIGHTS.tobytes())  # present: only the path is wrong
    (tmp_path / "src" / "metadata.json").write_bytes(WEIGHTS.tobytes())
    src = model_with_location(tmp_path / "src" / "model.onnx", location)
    with pytest.raises(ManifestError, match=reason) as refused:
        registry.register("churn", src, signature=SIG)
    assert str(src) in str(refused.value)
    assert repr(location) in str(refused.value)


def test_register_refuses_a_file_that_is_not_onnx_naming_it(
    registry: FileRegistry, tmp_path: Path
) -> None:
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\xff\x00 not a protobuf")
    with pytest.raises(
        RegistryError, match=rf"cannot register model 'churn': {junk} is not an ONNX"
    ):
        registry.register("churn", junk, signature=SIG)


def test_register_refuses_an_attachment_named_like_the_external_data(
    registry: FileRegistry, tmp_path: Path, attached: dict[str, Path]
) -> None:
    src = external_model(tmp_path / "src")
    with pytest.raises(InvalidName, match=r"'weights\.bin'"):
        registry.register(
            "churn", src, signature=SIG, attachments={"weights.bin": attached["profile.json"]}
        )


def test_fetch_refuses_external_data_overwritten_after_a_verified_fetch(
    registry: FileRegistry, tmp_path: Path
) -> None:
    mv = registry.register("churn", external_model(tmp_path / "src"), signature=SIG)
    registry.fetch(mv)
    weights = Path(mv.artifact).parent / "weights.bin"
    overwrite_same_size(weights)
    with pytest.raises(ChecksumMismatch) as refused:
        registry.fetch(mv)
    assert str(weights) in str(refused.value)
    assert mv.files["weights.bin"] in str(refused.value)
    assert "register the model again" in str(refused.value)


@pytest.mark.parametrize("name", ["feature_view.json", "profile.json"])
def test_a_tampered_attachment_is_refused_by_fetch_and_by_attachment(
    registry: FileRegistry, tmp_path: Path, attached: dict[str, Path], name: str
) -> None:
    mv = registry.register(
        "churn", external_model(tmp_path / "src"), signature=SIG, attachments=attached
    )
    path = registry.attachment("churn", "1", name)
    assert path.read_bytes() == attached[name].read_bytes()
    path.write_text('{"tampered": true}\n')
    with pytest.raises(ChecksumMismatch, match=re.escape(str(path))):
        registry.fetch(mv)
    with pytest.raises(ChecksumMismatch, match=re.escape(str(path))):
        registry.attachment("churn", "1", name)


def test_attachment_not_registered_is_attachment_not_found_listing_the_known(
    registry: FileRegistry, tmp_path: Path, attached: dict[str, Path]
) -> None:
    registry.register(
        "churn", external_model(tmp_path / "src"), signature=SIG, attachments=attached
    )
    with pytest.raises(
        AttachmentNotFound, match=r"'holdout.npz' \(attachments: feature_view.json, profile.json\)"
    ):
        registry.attachment("churn", "1", "holdout.npz")
    # Put there by hand, it is refused rather than served.
    planted = registry.root / "churn" / "1" / "holdout.npz"
    planted.write_bytes(b"planted")
    with pytest.raises(
        ManifestError, match=re.escape(f"{planted} is not in the version's manifest")
    ):
        registry.attachment("churn", "1", "holdout.npz")


@pytest.mark.parametrize("planted", ["extra.bin", ".hidden", "sub/deep.bin", "model.onnx.data"])
def test_fetch_refuses_a_file_the_manifest_does_not_list(
    registry: FileRegistry, tmp_path: Path, planted: str
) -> None:
    mv = registry.register("churn", external_model(tmp_path / "src"), signature=SIG)
    path = Path(mv.artifact).parent / planted
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(b"\x00" * 24)
    with pytest.raises(
        ManifestError, match=re.escape(f"{path} is not in the version's manifest")
    ) as refused:
        registry.fetch(mv)
    assert "remove it" in str(refused.value)


def test_fetch_refuses_a_missing_manifest_file_naming_it(
    registry: FileRegistry, tmp_path: Path, attached: dict[str, Path]
) -> None:
    mv = registry.register(
        "churn", external_model(tmp_path / "src"), signature=SIG, attachments=attached
    )
    for name in ("weights.bin", "feature_view.json"):
        path = Path(mv.artifact).parent / name
        saved = path.read_bytes()
        path.unlink()
        with pytest.raises(
            ManifestError, match=re.escape(f"file {path} of model 'churn' version 1 is missing")
        ):
            registry.fetch(mv)
        path.write_bytes(saved)
    registry.fetch(mv)


def test_fetch_refuses_a_symlink_even_to_identical_bytes(
    registry: FileRegistry, tmp_path: Path
) -> None:
    mv = registry.register("churn", external_model(tmp_path / "src"), signature=SIG)
    weights = Path(mv.artifact).parent / "weights.bin"
    weights.unlink()
    weights.symlink_to(tmp_path / "src" / "weights.bin")
    with pytest.raises(ManifestError, match=re.escape(f"{weights} is a symbolic link")):
        registry.fetch(mv)


def test_fetch_refuses_metadata_whose_manifest_was_edited(
    registry: FileRegistry, tmp_path: Path
) -> None:
    mv = registry.register("churn", external_model(tmp_path / "src"), signature=SIG)
    folder = Path(mv.artifact).parent
    weights = folder / "weights.bin"
    overwrite_same_size(weights)
    metadata = folder / "metadata.json"
    doc = json.loads(metadata.read_text())
    doc["files"]["weights.bin"] = sha(weights)  # the digest, not the manifest digest
    metadata.write_text(json.dumps(doc))
    with pytest.raises(ManifestError, match=re.escape(f"({metadata}) is inconsistent")):
        registry.fetch(registry.get_version("churn", "1"))


def test_fetch_refuses_a_graph_referencing_external_data_the_manifest_lacks(
    registry: FileRegistry, tmp_path: Path
) -> None:
    """metadata.json rewritten consistently without weights.bin (and the file gone): the graph
    still references it, and that is refused before ONNX Runtime looks for it."""
    mv = registry.register("churn", external_model(tmp_path / "src"), signature=SIG)
    folder = Path(mv.artifact).parent
    (folder / "weights.bin").unlink()
    doc = json.loads((folder / "metadata.json").read_text())
    del doc["files"]["weights.bin"]
    doc["external_data"] = []
    listing = "".join(f"{doc['files'][f]}  {f}\n" for f in sorted(doc["files"]))
    doc["manifest_sha256"] = hashlib.sha256(listing.encode()).hexdigest()
    (folder / "metadata.json").write_text(json.dumps(doc))
    with pytest.raises(ManifestError, match=r"references external data .*weights\.bin"):
        registry.fetch(registry.get_version("churn", "1"))


def test_a_newer_metadata_schema_asks_for_an_upgrade(
    registry: FileRegistry, artifact: Path
) -> None:
    mv = register(registry, artifact)
    metadata = Path(mv.artifact).parent / "metadata.json"
    doc = json.loads(metadata.read_text())
    doc["schema"] = 3
    metadata.write_text(json.dumps(doc))
    with pytest.raises(RegistryError, match=r"schema 3 .*upgrade batchline"):
        registry.get_version("churn", "1")


# -- versions registered before manifests (metadata schema 1) -----------------------------------


def legacy_version(registry: FileRegistry, src: Path, *extra: Path) -> ModelVersion:
    """A version laid out as batchline wrote it before manifests: model.onnx and metadata.json
    with only model.onnx's sha256, other files copied in beside them by hand."""
    folder = registry.root / "churn" / "1"
    folder.mkdir(parents=True)
    (folder / "model.onnx").write_bytes(src.read_bytes())
    for path in extra:
        (folder / path.name).write_bytes(path.read_bytes())
    doc = {
        "schema": 1,
        "name": "churn",
        "version": "1",
        "sha256": sha(src),
        "signature": SIG.to_dict(),
        "metrics": {},
        "created": "2024-01-01T00:00:00.000000Z",
        "source": "old batchline",
        "tags": {},
        "features": [],
        "description": "",
    }
    (folder / "metadata.json").write_text(json.dumps(doc))
    return registry.get_version("churn", "1")


def test_a_legacy_version_serves_with_one_warning_naming_rehash(
    registry: FileRegistry,
    artifact: Path,
    attached: dict[str, Path],
    caplog: pytest.LogCaptureFixture,
) -> None:
    mv = legacy_version(registry, artifact, attached["feature_view.json"])
    assert (mv.files, mv.manifest_sha256) == ({}, "")
    with caplog.at_level("WARNING", logger="registry_client.file_registry"):
        assert registry.fetch(mv).read_bytes() == PAYLOAD
        registry.fetch(mv)
        path = registry.attachment("churn", "1", "feature_view.json")
    assert path.read_bytes() == attached["feature_view.json"].read_bytes()
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1
    assert "feature_view.json" in warnings[0]
    assert f"batchline registry rehash churn 1 --registry {registry.root}" in warnings[0]
    # model.onnx is still checked against the sha256 it was registered with.
    Path(mv.artifact).write_bytes(PAYLOAD[:-1] + b"\x00")
    with pytest.raises(ChecksumMismatch):
        registry.fetch(mv)


def test_a_legacy_version_with_external_data_is_refused_until_rehashed(
    registry: FileRegistry, tmp_path: Path, attached: dict[str, Path]
) -> None:
    src = external_model(tmp_path / "src")
    mv = legacy_version(registry, src, src.parent / "weights.bin", attached["feature_view.json"])
    with pytest.raises(ManifestError, match=r"external data \(weights\.bin.*rehash churn 1"):
        registry.fetch(mv)

    rehashed = registry.rehash("churn", "1")
    folder = Path(mv.artifact).parent
    assert rehashed.files == {
        "model.onnx": sha(src),
        "weights.bin": sha(src.parent / "weights.bin"),
        "feature_view.json": sha(attached["feature_view.json"]),
    }
    assert rehashed.external_data == ("weights.bin",)
    assert registry.get_version("churn", "1") == rehashed
    assert json.loads((folder / "metadata.json").read_text())["rehashed"].endswith("Z")
    np.testing.assert_allclose(run_model(registry.fetch(rehashed)), np.ones((1, 3)) @ WEIGHTS)
    # From now on the version is held to its manifest like any other.
    overwrite_same_size(folder / "weights.bin")
    with pytest.raises(ChecksumMismatch, match=r"weights\.bin"):
        registry.fetch(rehashed)
    with pytest.raises(RegistryError, match="already has a manifest"):
        registry.rehash("churn", "1")


def test_rehash_refuses_a_model_that_no_longer_matches_its_sha256(
    registry: FileRegistry, artifact: Path
) -> None:
    mv = legacy_version(registry, artifact)
    Path(mv.artifact).write_bytes(PAYLOAD + b"\x00")
    with pytest.raises(ChecksumMismatch, match="register the model again instead"):
        registry.rehash("churn", "1")
    assert registry.get_version("churn", "1").files == {}


def test_rehash_refuses_a_nested_file_that_is_no_external_data(
    registry: FileRegistry, artifact: Path
) -> None:
    mv = legacy_version(registry, artifact)
    stray = Path(mv.artifact).parent / "sub" / "stray.bin"
    stray.parent.mkdir()
    stray.write_bytes(b"?")
    with pytest.raises(InvalidName, match=r"sub/stray\.bin"):
        registry.rehash("churn", "1")
