"""The demo models: registered as promised, and the ONNX export agrees with scikit-learn."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from registry_client import FileRegistry, Signature, TensorInfo
from registry_client.demo import (
    FEATURES,
    build_demo,
    load_holdout,
    load_reference,
    main,
    onnx_signature,
)

DEMO_VERSIONS = [("churn", "1"), ("churn", "2"), ("churn_mlp", "1")]
EXPECTED_SIGNATURE = Signature(
    inputs=(TensorInfo("input", "FP32", (-1, 15)),),
    outputs=(TensorInfo("label", "INT64", (-1,)), TensorInfo("probabilities", "FP32", (-1, 2))),
)


def _session(registry: FileRegistry, name: str, version: str) -> ort.InferenceSession:
    path = registry.fetch(registry.get_version(name, version))
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_demo_aliases_production_to_version_1_of_both_models(demo_registry: Path) -> None:
    registry = FileRegistry(demo_registry)
    assert registry.list_models() == ["churn", "churn_mlp"]
    assert registry.aliases("churn") == {"production": "1", "candidate": "2"}
    assert registry.aliases("churn_mlp") == {"production": "1"}


@pytest.mark.parametrize(("name", "version"), DEMO_VERSIONS)
def test_demo_version_records_features_metrics_and_provenance(
    demo_registry: Path, name: str, version: str
) -> None:
    mv = FileRegistry(demo_registry).get_version(name, version)
    assert mv.features == FEATURES == tuple(f"f{i}" for i in range(15))
    assert mv.source == "batchline build-demo"
    assert mv.tags["algorithm"] in {"GradientBoostingClassifier", "MLPClassifier"}
    assert mv.metrics["accuracy"] > 0.8
    assert mv.metrics["roc_auc"] > 0.9


@pytest.mark.parametrize(("name", "version"), DEMO_VERSIONS)
def test_recorded_signature_is_the_onnx_graphs_input_fp32_and_two_outputs(
    demo_registry: Path, name: str, version: str
) -> None:
    registry = FileRegistry(demo_registry)
    mv = registry.get_version(name, version)
    assert mv.signature == EXPECTED_SIGNATURE
    assert onnx_signature(registry.fetch(mv)) == EXPECTED_SIGNATURE


@pytest.mark.parametrize(("name", "version"), DEMO_VERSIONS)
def test_onnxruntime_sees_input_fp32_batch_by_15(
    demo_registry: Path, name: str, version: str
) -> None:
    session = _session(FileRegistry(demo_registry), name, version)
    (only_input,) = session.get_inputs()
    assert (only_input.name, only_input.type, only_input.shape[1]) == ("input", "tensor(float)", 15)
    assert not isinstance(only_input.shape[0], int)
    assert [(o.name, o.type) for o in session.get_outputs()] == [
        ("label", "tensor(int64)"),
        ("probabilities", "tensor(float)"),
    ]


@pytest.mark.parametrize(("name", "version"), DEMO_VERSIONS)
def test_onnx_probabilities_match_scikit_learn_predict_proba_within_1e_5(
    demo_registry: Path, name: str, version: str
) -> None:
    holdout = load_holdout(demo_registry, name, version)
    session = _session(FileRegistry(demo_registry), name, version)
    _, probabilities = session.run(None, {"input": holdout.X})
    assert probabilities.dtype == np.float32
    np.testing.assert_allclose(probabilities, holdout.probabilities, rtol=0, atol=1e-5)


@pytest.mark.parametrize(("name", "version"), DEMO_VERSIONS)
def test_onnx_labels_equal_scikit_learn_predict(
    demo_registry: Path, name: str, version: str
) -> None:
    holdout = load_holdout(demo_registry, name, version)
    session = _session(FileRegistry(demo_registry), name, version)
    labels, _ = session.run(None, {"input": holdout.X})
    assert labels.dtype == np.int64
    np.testing.assert_array_equal(labels, holdout.labels)


def test_reference_sample_is_float32_rows_of_15_features_with_binary_labels(
    demo_registry: Path,
) -> None:
    X, y = load_reference(demo_registry, "churn", "1")
    assert X.dtype == np.float32
    assert X.shape == (2000, 15)
    assert y.shape == (2000,)
    assert set(np.unique(y)) == {0, 1}


def test_building_again_without_force_returns_the_existing_versions(demo_registry: Path) -> None:
    registry = FileRegistry(demo_registry)
    before = {name: registry.list_versions(name) for name in registry.list_models()}
    assert build_demo(demo_registry, quick=True) == before


def test_building_with_force_registers_fresh_versions_and_moves_production(
    demo_registry: Path, tmp_path: Path
) -> None:
    root = tmp_path / "registry"
    shutil.copytree(demo_registry, root)
    built = build_demo(root, quick=True, force=True)
    assert {name: [mv.version for mv in mvs] for name, mvs in built.items()} == {
        "churn": ["3", "4"],
        "churn_mlp": ["2"],
    }
    registry = FileRegistry(root)
    assert registry.resolve("churn").version == "3"
    assert [v for v, _ in registry.alias_history("churn", "production")] == ["1", "3"]
    # Same seed, same training, fixed graph name: the rebuilt artifact is byte-identical.
    assert built["churn"][0].sha256 == registry.get_version("churn", "1").sha256


def test_cli_lists_each_version_with_its_aliases(
    demo_registry: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--registry", str(demo_registry), "--quick"]) == 0
    out = capsys.readouterr().out
    assert "churn@1 [production]" in out
    assert "churn@2 [candidate]" in out
    assert "churn_mlp@1 [production]" in out
