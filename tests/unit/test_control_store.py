"""The registry's control records: generations never lost, fields kept, malformed files named."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import pytest
from onnx import TensorProto, helper

from registry_client import FileRegistry, RegistryError, Signature
from registry_client.control import FileControlStore
from server.control import route_from_record


def _registry(tmp_path: Path) -> FileRegistry:
    registry = FileRegistry(tmp_path / "reg")
    artifact = tmp_path / "m.onnx"
    # The registry reads the graph (for external data), so the artifact is a real ONNX model.
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3])
    y = helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", 3])
    graph = helper.make_graph([helper.make_node("Identity", ["input"], ["output"])], "m", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    artifact.write_bytes(model.SerializeToString())
    registry.register("churn", artifact, signature=Signature(inputs=(), outputs=()))
    return registry


def _writer(root: str, n: int) -> None:
    store = FileControlStore(FileRegistry(root), "prod")
    for i in range(n):
        store.update("churn", ref=f"churn@{i % 2 + 1}")


def test_concurrent_writers_in_two_processes_lose_no_generation(tmp_path: Path) -> None:
    registry = _registry(tmp_path)
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(str(registry.root), 25)) for _ in range(2)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(60)
        assert proc.exitcode == 0
    assert FileControlStore(registry, "prod").read("churn").generation == 50


def test_an_update_keeps_the_fields_it_does_not_name_and_deployments_are_apart(
    tmp_path: Path,
) -> None:
    registry = _registry(tmp_path)
    prod, staging = FileControlStore(registry, "prod"), FileControlStore(registry, "staging")
    assert prod.read("churn").generation == 0
    route = {"canary": "2", "canary_percent": 5.0, "shadows": []}
    prod.update("churn", route=route)
    state = prod.update("churn", ref="churn@2")
    assert (state.generation, state.ref, state.route) == (2, "churn@2", route)
    assert prod.read("churn") == state
    assert staging.read("churn").generation == 0
    token = prod.change_token("churn")
    staging.update("churn", ref="churn@1")
    assert prod.change_token("churn") != token  # one file: any write may change the record


def test_a_corrupt_control_file_is_an_error_naming_it(tmp_path: Path) -> None:
    registry = _registry(tmp_path)
    (registry.root / "churn" / "control.json").write_text("{not json")
    with pytest.raises(RegistryError, match=r"control\.json"):
        FileControlStore(registry, "prod").read("churn")


def test_a_stored_route_drops_what_became_the_primary() -> None:
    record = {
        "canary": "2",
        "canary_percent": 30.0,
        "shadows": [{"version": "3", "sample_percent": 50.0}, {"version": "4"}],
    }
    same = route_from_record("churn", "1", record)
    assert (same.canary, [s.version for s in same.shadows]) == ("2", ["3", "4"])
    moved = route_from_record("churn", "2", record)
    assert (moved.canary, moved.canary_percent) == (None, 0.0)
    promoted = route_from_record("churn", "4", record)
    assert promoted.canary == "2"
    assert [(s.version, s.sample_percent) for s in promoted.shadows] == [("3", 50.0)]
