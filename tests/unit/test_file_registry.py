"""FileRegistry and model references, against a real folder (artifacts are dummy bytes)."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from registry_client import (
    AliasNotFound,
    ChecksumMismatch,
    FileRegistry,
    InvalidName,
    InvalidReference,
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
PAYLOAD = b"not really onnx, the registry never parses it\n" * 64
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
