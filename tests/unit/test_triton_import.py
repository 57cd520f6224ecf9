"""`batchline registry import`: a Triton model repository (config.pbtxt, numbered versions) or a
bare .onnx into a FileRegistry in tmp_path; the CLI run in-process; the batchline.toml it writes
loads as batchline settings."""

from __future__ import annotations

from pathlib import Path

import pytest

from registry_client import FileRegistry, RegistryError
from registry_client.cli import main
from registry_client.triton_repo import find_models, parse_pbtxt
from server.config import load_settings
from tests.unit.test_registry_cli import tiny_onnx

CONFIG = """
# a Triton config as the model navigator writes them
name: "churn"
platform: "onnxruntime_onnx"
max_batch_size: 32
input [ { name: "input" data_type: TYPE_FP32 dims: [ 3 ] } ]
output [ { name: "output", data_type: TYPE_FP32, dims: [ 3 ] } ]
dynamic_batching {
  preferred_batch_size: [ 8, 16 ]
  max_queue_delay_microseconds: 500
}
instance_group [ { count: 2 kind: KIND_CPU }, { count: 1, kind: KIND_CPU } ]
optimization { execution_accelerators { cpu_execution_accelerator : [ { name : "openvino" } ] } }
"""


def _repository(root: Path) -> Path:
    for name, config in (("churn", CONFIG), ("other", None)):
        model = root / name
        for version in ("1", "3"):
            (model / version).mkdir(parents=True)
            tiny_onnx(model / version / "model.onnx", width=3 if version == "1" else 4)
        if config is not None:
            (model / "config.pbtxt").write_text(config)
    (root / "other" / "notes").mkdir()  # not a version: ignored
    return root


def test_pbtxt_reader_handles_triton_syntax() -> None:
    config = parse_pbtxt(CONFIG)
    assert config["max_batch_size"] == [32]
    assert config["input"][0]["dims"] == [3]
    assert config["dynamic_batching"][0]["preferred_batch_size"] == [8, 16]
    assert [g["count"] for g in config["instance_group"]] == [[2], [1]]
    assert config["instance_group"][0]["kind"] == ["KIND_CPU"]


def test_import_registers_versions_in_order_and_points_the_alias_at_the_newest(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    repo = _repository(tmp_path / "triton")
    registry = tmp_path / "registry"
    out = tmp_path / "batchline.toml"
    code = main(["registry", "import", str(repo), "--registry", str(registry),
                 "--config-out", str(out)])  # fmt: skip
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert "imported churn Triton version 3 as version 2" in printed.out
    store = FileRegistry(registry)
    for name in ("churn", "other"):
        assert [v.version for v in store.list_versions(name)] == ["1", "2"]
        newest = store.resolve(f"{name}@production")
        assert newest.version == "2"
        assert newest.signature.inputs[0].shape == (-1, 4)  # Triton's version 3
        assert newest.tags["triton.version"] == "3"
    assert store.resolve("churn@production").tags["triton.max_batch_size"] == "32"
    settings = load_settings(out, server_overrides={"registry": str(registry)})
    churn = {m.name: m for m in settings.models}["churn"]
    assert churn.ref == "churn@production"
    assert (churn.max_batch_size, churn.max_queue_delay_us) == (32, 500)
    assert churn.preferred_batch_sizes == (8, 16)
    assert churn.instances == 3
    other = {m.name: m for m in settings.models}["other"]
    assert other.max_batch_size == 64  # no config.pbtxt: batchline's defaults


def test_a_bare_onnx_imports_under_its_name(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = tiny_onnx(tmp_path / "scorer.onnx")
    registry = tmp_path / "registry"
    assert main(["registry", "import", str(model), "--registry", str(registry)]) == 0
    assert "[models.scorer]" in capsys.readouterr().out
    assert FileRegistry(registry).resolve("scorer@production").version == "1"
    assert main(["registry", "import", str(model), "--registry", str(registry),
                 "--name", "renamed", "--alias", "staging"]) == 0  # fmt: skip
    assert FileRegistry(registry).resolve("renamed@staging").version == "1"


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ('platform: "tensorrt_plan"\nmax_batch_size: 8\n', "platform 'tensorrt_plan'"),
        ('max_batch_size: 8\ninput [ { name: "x" \n', "not closed"),
        ("max_batch_size: -3\n", "max_batch_size must be an integer >= 0"),
    ],
)
def test_bad_repositories_are_refused_naming_the_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], config: str, message: str
) -> None:
    model = tmp_path / "repo" / "bad"
    (model / "1").mkdir(parents=True)
    tiny_onnx(model / "1" / "model.onnx")
    (model / "config.pbtxt").write_text(config)
    registry = tmp_path / "registry"
    code = main(["registry", "import", str(tmp_path / "repo"), "--registry", str(registry)])
    err = capsys.readouterr().err
    assert code == 1
    assert message in err
    assert not (registry / "bad").exists()  # nothing written


def test_missing_model_files_and_empty_folders_are_named(tmp_path: Path) -> None:
    model = tmp_path / "repo" / "m"
    (model / "2").mkdir(parents=True)
    with pytest.raises(RegistryError, match=r"version 2 has no model\.onnx"):
        find_models(tmp_path / "repo")
    (tmp_path / "empty").mkdir()
    with pytest.raises(RegistryError, match="no models found"):
        find_models(tmp_path / "empty")
