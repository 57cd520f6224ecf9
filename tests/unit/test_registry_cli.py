"""`batchline registry ...` run in-process against a FileRegistry in tmp_path, plus rollback.

The MLflow round trip of the same CLI lives in tests/integration/test_mlflow_registry.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from registry_client import (
    AliasNotFound,
    FileRegistry,
    MlflowRegistry,
    NothingToRollBack,
    RegistryError,
    Signature,
    TensorInfo,
    open_registry,
    rollback,
)
from registry_client.cli import main
from registry_client.rollback import previous_version


def tiny_onnx(path: Path, width: int = 3) -> Path:
    """A one-node ONNX model (Identity), input FP32 [batch, width]: fast, no training."""
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", width])
    y = helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", width])
    graph = helper.make_graph(
        [helper.make_node("Identity", ["input"], ["output"])], "tiny", [x], [y]
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path.write_bytes(model.SerializeToString())
    return path


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "registry"


@pytest.fixture
def onnx_file(tmp_path: Path) -> Path:
    return tiny_onnx(tmp_path / "model.onnx")


class Cli:
    """Runs the CLI in-process and returns (exit code, stdout, stderr)."""

    def __init__(self, capsys: pytest.CaptureFixture[str], registry: str) -> None:
        self._capsys = capsys
        self.registry = registry

    def __call__(self, *argv: str) -> tuple[int, str, str]:
        self._capsys.readouterr()
        code = main(["registry", *argv, "--registry", self.registry])
        out, err = self._capsys.readouterr()
        return code, out, err

    def json(self, *argv: str) -> Any:
        code, out, err = self(*argv, "--json")
        assert code == 0, err
        return json.loads(out)


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str], root: Path) -> Cli:
    return Cli(capsys, str(root))


def test_register_reads_the_onnx_signature_and_records_metrics_and_tags(
    cli: Cli, root: Path, onnx_file: Path
) -> None:
    code, out, err = cli(
        "register", "churn", str(onnx_file),
        "--metric", "accuracy=0.91", "--tag", "team=risk", "--features", "a, b,c",
        "--description", "tiny identity",
    )  # fmt: skip
    assert code == 0, err
    assert out.startswith("registered churn version 1 ")
    mv = FileRegistry(root).get_version("churn", "1")
    assert mv.signature == Signature(
        inputs=(TensorInfo("input", "FP32", (-1, 3)),),
        outputs=(TensorInfo("output", "FP32", (-1, 3)),),
    )
    assert mv.metrics == {"accuracy": 0.91}
    assert mv.tags == {"team": "risk"}
    assert mv.features == ("a", "b", "c")
    assert mv.description == "tiny identity"


def test_register_with_alias_points_it_at_the_new_version(
    cli: Cli, root: Path, onnx_file: Path
) -> None:
    assert cli("register", "churn", str(onnx_file))[0] == 0
    code, out, _ = cli("register", "churn", str(onnx_file), "--alias", "Production")
    assert code == 0
    assert "churn@production: - -> 2" in out
    assert FileRegistry(root).aliases("churn") == {"production": "2"}


def test_list_shows_every_model_with_versions_and_aliases(
    cli: Cli, root: Path, onnx_file: Path
) -> None:
    root.mkdir()
    assert cli("list")[1].strip() == f"no models in {cli.registry}"
    cli("register", "churn", str(onnx_file), "--alias", "production")
    cli("register", "churn", str(onnx_file), "--alias", "candidate")
    cli("register", "fraud", str(onnx_file))
    code, out, _ = cli("list")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["MODEL", "VERSIONS", "LATEST", "ALIASES"]
    assert lines[1].split() == ["churn", "2", "2", "candidate=2,", "production=1"]
    assert lines[2].split() == ["fraud", "1", "1", "-"]
    assert cli.json("list") == [
        {"name": "churn", "versions": ["1", "2"], "aliases": {"candidate": "2", "production": "1"}},
        {"name": "fraud", "versions": ["1"], "aliases": {}},
    ]


def test_show_lists_versions_aliases_and_alias_history(cli: Cli, onnx_file: Path) -> None:
    cli("register", "churn", str(onnx_file), "--metric", "auc=0.5", "--alias", "production")
    cli("register", "churn", str(onnx_file), "--alias", "production")
    code, out, _ = cli("show", "churn")
    assert code == 0
    assert out.splitlines()[0] == "churn: 2 versions"
    assert "  version 1  [-]  " in out
    assert "auc=0.5000" in out
    assert "  version 2  [production]  " in out
    assert "  production: 1 -> 2" in out
    doc = cli.json("show", "churn")
    assert doc["aliases"] == {"production": "2"}
    assert [h["version"] for h in doc["alias_history"]["production"]] == ["1", "2"]
    assert [v["version"] for v in doc["versions"]] == ["1", "2"]
    assert doc["versions"][0]["signature"]["inputs"][0]["shape"] == [-1, 3]


def test_promote_moves_the_alias(cli: Cli, root: Path, onnx_file: Path) -> None:
    cli("register", "churn", str(onnx_file), "--alias", "production")
    cli("register", "churn", str(onnx_file))
    code, out, _ = cli("promote", "churn", "2")
    assert (code, out.splitlines()[0]) == (0, "churn@production: 1 -> 2")
    assert "batchline admin reload churn" in out  # how a running server takes it now
    code, out, _ = cli("promote", "churn", "1", "--alias", "canary")
    assert (code, out.splitlines()[0]) == (0, "churn@canary: - -> 1")
    assert FileRegistry(root).aliases("churn") == {"production": "2", "canary": "1"}


def test_rollback_returns_the_alias_to_its_previous_version(
    cli: Cli, root: Path, onnx_file: Path
) -> None:
    for _ in range(3):
        cli("register", "churn", str(onnx_file), "--alias", "production")
    code, out, _ = cli("rollback", "churn")
    assert (code, out.strip()) == (0, "churn@production: rolled back 3 -> 2")
    assert FileRegistry(root).aliases("churn")["production"] == "2"


def test_errors_name_the_model_version_or_alias_and_exit_1(cli: Cli, onnx_file: Path) -> None:
    cli("register", "churn", str(onnx_file), "--alias", "production")
    code, _, err = cli("show", "nope")
    assert code == 1
    assert "'nope'" in err
    code, _, err = cli("promote", "churn", "7")
    assert code == 1
    assert "no version '7'" in err
    code, _, err = cli("rollback", "churn")
    assert code == 1
    assert "alias 'production'" in err
    assert "nothing to roll back" in err
    code, _, err = cli("rollback", "churn", "--alias", "canary")
    assert code == 1
    assert "no alias 'canary'" in err


def test_register_refuses_a_file_that_is_not_onnx(cli: Cli, tmp_path: Path) -> None:
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\xff\x00 not a protobuf")
    code, _, err = cli("register", "churn", str(junk))
    assert code == 1
    assert str(junk) in err
    code, _, err = cli("register", "churn", str(tmp_path / "missing.onnx"))
    assert code == 1
    assert "missing.onnx" in err


@pytest.mark.parametrize("bad", [["--metric", "auc"], ["--metric", "auc=high"], ["--tag", "=x"]])
def test_register_rejects_malformed_key_values(cli: Cli, onnx_file: Path, bad: list[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli("register", "churn", str(onnx_file), *bad)
    assert exc.value.code == 2


def test_rollback_twice_undoes_the_rollback(tmp_path: Path, onnx_file: Path) -> None:
    registry = FileRegistry(tmp_path / "r")
    sig = Signature(inputs=(), outputs=())
    for _ in range(3):
        mv = registry.register("churn", onnx_file, signature=sig)
        registry.set_alias("churn", "production", mv.version)
    assert rollback(registry, "churn") == "2"
    assert rollback(registry, "churn") == "3"
    assert registry.aliases("churn")["production"] == "3"


def test_rollback_without_an_earlier_version_names_the_alias(
    tmp_path: Path, onnx_file: Path
) -> None:
    registry = FileRegistry(tmp_path / "r")
    mv = registry.register("churn", onnx_file, signature=Signature(inputs=(), outputs=()))
    with pytest.raises(AliasNotFound, match="'production'"):
        rollback(registry, "churn")
    registry.set_alias("churn", "production", mv.version)
    with pytest.raises(NothingToRollBack, match=r"alias 'production'.*version 1"):
        rollback(registry, "churn")


@pytest.mark.parametrize(
    ("history", "current", "expected"),
    [
        (["1"], "1", None),
        (["1", "2"], "2", "1"),
        (["1", "2", "3"], "3", "2"),
        (["1", "2", "1"], "1", "2"),
        (["1", "2", "2"], "2", "1"),
        (["1", "2"], "5", "2"),  # moved outside the history: back to the last recorded
        ([], "1", None),
    ],
)
def test_previous_version_is_the_last_other_version_held(
    history: list[str], current: str, expected: str | None
) -> None:
    assert previous_version([(v, "") for v in history], current) == expected


def test_open_registry_picks_the_backend_from_the_spec(tmp_path: Path) -> None:
    assert isinstance(open_registry(str(tmp_path)), FileRegistry)
    file_registry = open_registry(f"file://{tmp_path}")
    assert isinstance(file_registry, FileRegistry)
    assert file_registry.root == tmp_path.resolve()
    mlflow = open_registry("mlflow+http://127.0.0.1:5000", cache_dir=tmp_path / "cache")
    assert isinstance(mlflow, MlflowRegistry)
    assert mlflow.base_url == "http://127.0.0.1:5000"
    assert mlflow.cache_dir == (tmp_path / "cache").resolve()
    secure = open_registry("mlflow+https://mlflow.example:8443/prefix", cache_dir=tmp_path)
    assert isinstance(secure, MlflowRegistry)
    assert secure.base_url == "https://mlflow.example:8443/prefix"


def test_open_registry_default_cache_is_per_server(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    registry = open_registry("mlflow+http://127.0.0.1:5000")
    assert isinstance(registry, MlflowRegistry)
    assert registry.cache_dir == tmp_path / "batchline" / "mlflow" / "127.0.0.1_5000"


@pytest.mark.parametrize("spec", ["http://127.0.0.1:5000", "s3://bucket/x", "mlflow+http://", ""])
def test_open_registry_refuses_what_it_cannot_open(spec: str) -> None:
    with pytest.raises(RegistryError):
        open_registry(spec)


# -- manifests: attach, verify, rehash ----------------------------------------------------------


def _sha(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_register_attaches_files_and_verify_checks_every_file(
    cli: Cli, root: Path, onnx_file: Path, tmp_path: Path
) -> None:
    view = tmp_path / "feature_view.json"
    view.write_text("{}\n")
    profile = tmp_path / "p.json"
    profile.write_text("[]\n")
    code, out, err = cli(
        "register", "churn", str(onnx_file), "--attach", str(view),
        "--attach", f"profile.json={profile}",
    )  # fmt: skip
    assert code == 0, err
    mv = FileRegistry(root).get_version("churn", "1")
    assert mv.files == {
        "model.onnx": _sha(onnx_file),
        "feature_view.json": _sha(view),
        "profile.json": _sha(profile),
    }
    assert f"manifest={mv.manifest_sha256[:12]} (3 files)" in out
    code, out, err = cli("verify", "churn@1")
    assert (code, out.strip()) == (
        0,
        f"churn version 1: 3 files verified, manifest sha256={mv.manifest_sha256}",
    )

    tampered = root / "churn" / "1" / "feature_view.json"
    tampered.write_text('{"x": 1}\n')
    code, _, err = cli("verify", "churn@1")
    assert code == 1
    assert str(tampered) in err
    assert "Traceback" not in err


@pytest.mark.parametrize("bad", ["=x.json", "name="])
def test_register_rejects_a_malformed_attach(cli: Cli, onnx_file: Path, bad: str) -> None:
    with pytest.raises(SystemExit) as exc:
        cli("register", "churn", str(onnx_file), "--attach", bad)
    assert exc.value.code == 2


def test_rehash_writes_a_manifest_for_a_legacy_version_and_refuses_a_second_time(
    cli: Cli, root: Path, onnx_file: Path
) -> None:
    cli("register", "churn", str(onnx_file))
    folder = root / "churn" / "1"
    doc = json.loads((folder / "metadata.json").read_text())
    for key in ("files", "manifest_sha256", "external_data"):
        del doc[key]
    doc["schema"] = 1
    (folder / "metadata.json").write_text(json.dumps(doc))
    (folder / "feature_view.json").write_text("{}\n")  # copied in by hand, as before manifests

    code, out, _ = cli("verify", "churn@1")
    assert code == 0
    assert "registered before manifests" in out
    code, out, err = cli("rehash", "churn", "1")
    assert code == 0, err
    mv = FileRegistry(root).get_version("churn", "1")
    assert mv.files == {
        "model.onnx": _sha(onnx_file),
        "feature_view.json": _sha(folder / "feature_view.json"),
    }
    assert out.splitlines()[0] == f"churn version 1: manifest written, sha256={mv.manifest_sha256}"
    assert f"  {mv.files['feature_view.json']}  feature_view.json  (attachment)" in out
    code, _, err = cli("rehash", "churn", "1")
    assert code == 1
    assert "already has a manifest" in err


def test_rehash_is_for_a_file_registry(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["registry", "rehash", "churn", "1", "--registry", "mlflow+http://127.0.0.1:9"])
    assert code == 1
    assert "not" in capsys.readouterr().err


def test_verify_as_a_subprocess_names_the_planted_file_and_exits_1(
    root: Path, onnx_file: Path
) -> None:
    import subprocess
    import sys

    registry = FileRegistry(root)
    registry.register("churn", onnx_file, signature=Signature(inputs=(), outputs=()))
    stray = root / "churn" / "1" / "extra.bin"
    stray.write_bytes(b"planted")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "server.cli",
            "registry",
            "verify",
            "churn@1",
            "--registry",
            str(root),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1, result.stderr
    assert f"{stray} is not in the version's manifest" in result.stderr
    assert "Traceback" not in result.stderr


# ---- models as users export them ------------------------------------------------------------


def sklearn_classifier(path: Path, labels: tuple[Any, Any] = (0, 1), **convert: Any) -> Any:
    """A LogisticRegression on 8 features exported by skl2onnx as users do: by default with
    ZipMap (output_probability a list of {class: probability} maps). Returns the classifier."""
    import numpy as np
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(7)
    X = rng.normal(size=(300, 8)).astype(np.float32)
    y = np.where(X[:, 0] + 0.5 * X[:, 3] > 0, labels[1], labels[0])
    clf = LogisticRegression().fit(X, y)
    onx = convert_sklearn(clf, initial_types=[("input", FloatTensorType([None, 8]))], **convert)
    path.write_bytes(onx.SerializeToString())
    return clf


def _run_onnx(path: Path, X: Any) -> list[Any]:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return list(session.run(None, {"input": X}))


@pytest.mark.parametrize("labels", [(0, 1), ("stay", "churn")])
def test_a_zipmap_classifier_is_registered_with_probabilities_as_a_tensor(
    cli: Cli, root: Path, tmp_path: Path, labels: tuple[Any, Any]
) -> None:
    import numpy as np

    exported = tmp_path / "clf.onnx"
    clf = sklearn_classifier(exported, labels)
    code, out, err = cli("register", "clf", str(exported), "--alias", "production")
    assert code == 0, err
    assert "unwrapped skl2onnx's ZipMap into FP32 [-1, 2]" in out
    mv = FileRegistry(root).get_version("clf", "1")
    label_type = "INT64" if labels == (0, 1) else "BYTES"
    assert mv.signature.outputs == (
        TensorInfo("output_label", label_type, (-1,)),
        TensorInfo("output_probability", "FP32", (-1, 2)),
    )
    classes = [str(c) for c in clf.classes_]
    assert mv.tags["batchline.classes.output_probability"] == ",".join(classes)
    # The registered artifact answers what scikit-learn predicts, column j = clf.classes_[j].
    X = np.random.default_rng(11).normal(size=(64, 8)).astype(np.float32)
    got_labels, got_proba = _run_onnx(Path(mv.artifact), X)
    np.testing.assert_allclose(got_proba, clf.predict_proba(X), rtol=1e-4, atol=1e-5)
    assert [str(v) for v in got_labels] == [str(v) for v in clf.predict(X)]


def test_a_zipmap_output_is_refused_with_skl2onnx_option_when_asked(
    cli: Cli, root: Path, tmp_path: Path
) -> None:
    exported = tmp_path / "clf.onnx"
    sklearn_classifier(exported)
    root.mkdir()
    code, out, err = cli("register", "clf", str(exported), "--no-zipmap-unwrap")
    assert (code, out) == (1, "")
    assert "output 'output_probability' is a ZipMap" in err
    assert "options={id(clf): {'zipmap': False}}" in err
    assert "options={'zipmap': False}" in err
    assert FileRegistry(root).list_models() == []


def test_an_export_without_zipmap_is_registered_as_it_is(
    cli: Cli, root: Path, tmp_path: Path
) -> None:
    import hashlib

    exported = tmp_path / "clf.onnx"
    sklearn_classifier(exported, options={"zipmap": False})
    code, out, err = cli("register", "clf", str(exported))
    assert code == 0, err
    assert "ZipMap" not in out
    mv = FileRegistry(root).get_version("clf", "1")
    assert mv.sha256 == hashlib.sha256(exported.read_bytes()).hexdigest()
    assert mv.signature.outputs[1] == TensorInfo("probabilities", "FP32", (-1, 2))


def fixed_batch_onnx(path: Path, batch: int = 1, width: int = 8) -> Path:
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch, width])
    y = helper.make_tensor_value_info("output", TensorProto.FLOAT, [batch, width])
    graph = helper.make_graph([helper.make_node("Relu", ["input"], ["output"])], "fixed", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path.write_bytes(model.SerializeToString())
    return path


def test_a_fixed_batch_dimension_is_refused_at_register_time(
    cli: Cli, root: Path, tmp_path: Path
) -> None:
    root.mkdir()
    code, _, err = cli("register", "fixed", str(fixed_batch_onnx(tmp_path / "fixed.onnx")))
    assert code == 1
    assert "input 'input' has a fixed first dimension of 1 ([1, 8])" in err
    assert "FloatTensorType([None, ...])" in err
    assert "dynamic_axes={'input': {0: 'batch'}}" in err
    assert FileRegistry(root).list_models() == []


def test_features_must_name_every_input_column(cli: Cli, root: Path, tmp_path: Path) -> None:
    model = tiny_onnx(tmp_path / "eight.onnx", width=8)
    root.mkdir()
    code, _, err = cli("register", "m", str(model), "--features", "a,b,c")
    assert code == 1
    assert "--features: 3 names (a, b, c)" in err
    assert "takes 8 features" in err
    code, _, err = cli("register", "m", str(model), "--features", "a,b,c,d,e,f,g,a")
    assert code == 1
    assert "--features: 'a' appears twice" in err
    assert FileRegistry(root).list_models() == []
    names = ",".join(f"x{i}" for i in range(8))
    assert cli("register", "m", str(model), "--features", names)[0] == 0
    assert FileRegistry(root).get_version("m", "1").features == tuple(names.split(","))


def test_register_says_how_to_serve_the_new_version(cli: Cli, onnx_file: Path) -> None:
    code, out, _ = cli("register", "churn", str(onnx_file))
    assert code == 0
    assert "not served yet: no alias points at churn yet" in out
    assert f"batchline registry promote churn 1 --registry {cli.registry}" in out
    assert "--alias production" in out
    cli("promote", "churn", "1")
    code, out, _ = cli("register", "churn", str(onnx_file))
    assert "churn@production is version 1" in out
    assert "batchline registry promote churn 2" in out
    code, out, _ = cli("register", "churn", str(onnx_file), "--alias", "candidate")
    assert f"serve it: batchline serve --registry {cli.registry} --model churn@candidate" in out


def test_reads_refuse_a_missing_registry_folder(cli: Cli, root: Path) -> None:
    for command in (["list"], ["show", "churn"], ["promote", "churn", "1"], ["rollback", "churn"]):
        code, out, err = cli(*command)
        assert code == 1, command
        assert f"--registry {root}: no such folder" in err
        assert "batchline registry register NAME model.onnx" in err
        assert out == ""
    assert not root.exists()


def test_the_registry_comes_from_batchline_registry_when_not_given(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    root: Path,
    onnx_file: Path,
) -> None:
    monkeypatch.delenv("BATCHLINE_REGISTRY", raising=False)
    assert main(["registry", "list"]) == 1
    assert "pass --registry DIR (or mlflow+http://HOST:PORT) or set BATCHLINE_REGISTRY" in (
        capsys.readouterr().err
    )
    monkeypatch.setenv("BATCHLINE_REGISTRY", str(root))
    assert main(["registry", "list"]) == 1
    assert f"BATCHLINE_REGISTRY={root}: no such folder" in capsys.readouterr().err
    assert main(["registry", "register", "churn", str(onnx_file), "--alias", "production"]) == 0
    assert FileRegistry(root).aliases("churn") == {"production": "1"}
    capsys.readouterr()
    assert main(["registry", "list", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == [
        {"name": "churn", "versions": ["1"], "aliases": {"production": "1"}}
    ]


# ---- reference profiles for any model ---------------------------------------------------------


def _reference_csv(path: Path, X: Any) -> tuple[str, ...]:
    names = tuple(f"x{i}" for i in range(X.shape[1]))
    lines = [",".join(("id", *names))] + [
        ",".join((str(i), *(repr(float(v)) for v in row))) for i, row in enumerate(X)
    ]
    path.write_text("\n".join(lines) + "\n")
    return names


def test_register_with_reference_data_writes_a_profile_the_sidecar_reads(
    root: Path, tmp_path: Path
) -> None:
    """Your own model gets a drift reference: the real CLI profiles the CSV's feature columns
    and the model's own scores; edges checked against numpy's deciles of sklearn's
    predict_proba, computed here, not by the profile code."""
    import subprocess
    import sys

    import numpy as np

    from registry_client.profile import ReferenceProfile
    from server.drift.sidecar import registry_profiles

    exported = tmp_path / "clf.onnx"
    clf = sklearn_classifier(exported)
    X = np.random.default_rng(3).normal(size=(400, 8)).astype(np.float32)
    names = _reference_csv(tmp_path / "train.csv", X)
    result = subprocess.run(
        [sys.executable, "-m", "server.cli", "registry", "register", "mine", str(exported),
         "--registry", str(root), "--reference", str(tmp_path / "train.csv"),
         "--features", ",".join(names), "--alias", "production"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "reference profile from" in result.stdout
    registry = FileRegistry(root)
    profile = ReferenceProfile.from_json(
        registry.attachment("mine", "1", "profile.json").read_text()
    )
    assert profile.rows == 400
    assert profile.feature_names == names
    scores = clf.predict_proba(X.astype(np.float64))[:, 1]
    expected = np.unique(np.quantile(scores, np.linspace(0, 1, 11)[1:-1], method="lower"))
    # The ONNX model computes in float32, sklearn in float64.
    np.testing.assert_allclose(profile.score.edges, expected, rtol=1e-3)
    loaded = registry_profiles(root)("mine", "1")
    assert loaded is not None
    assert loaded.rows == 400


def test_reference_data_with_the_wrong_columns_is_one_line_naming_them(
    root: Path, tmp_path: Path
) -> None:
    import subprocess
    import sys

    import numpy as np

    exported = tmp_path / "clf.onnx"
    sklearn_classifier(exported)
    _reference_csv(tmp_path / "train.csv", np.zeros((5, 3), np.float32))
    result = subprocess.run(
        [sys.executable, "-m", "server.cli", "registry", "register", "mine", str(exported),
         "--registry", str(root), "--reference", str(tmp_path / "train.csv")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode != 0
    assert "--reference" in result.stderr
    assert "id, x0, x1, x2" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (root / "mine").exists()


def test_profile_gives_an_existing_version_a_reference_as_the_next_version(
    cli: Cli, root: Path, tmp_path: Path
) -> None:
    import numpy as np

    exported = tmp_path / "clf.onnx"
    sklearn_classifier(exported)
    assert cli("register", "mine", str(exported), "--alias", "production")[0] == 0
    X = np.random.default_rng(4).normal(size=(50, 8)).astype(np.float32)
    names = _reference_csv(tmp_path / "train.csv", X)
    code, _out, err = cli(
        "profile", "mine", "1", "--reference", str(tmp_path / "train.csv"),
        "--features", ",".join(names), "--alias", "production",
    )  # fmt: skip
    assert code == 0, err
    registry = FileRegistry(root)
    one, two = registry.get_version("mine", "1"), registry.get_version("mine", "2")
    assert one.sha256 == two.sha256  # the same model, now with a profile
    assert registry.aliases("mine")["production"] == "2"
    assert registry.attachment("mine", "2", "profile.json").is_file()
    registry.fetch(two)  # its manifest holds
