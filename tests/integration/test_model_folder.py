"""`batchline serve --registry DIR` where DIR holds model files, not a registry: the one
model.onnx a KServe storageUri downloads to /mnt/models, or a Triton model repository. The
server imports them into a registry of its own at start and serves the one model named.

Expected outputs come from onnxruntime run in this process on the same file."""

from __future__ import annotations

import shutil
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort

from registry_client import FileRegistry
from registry_client.demo import load_holdout
from server._proto import inference_pb2_grpc as pb_grpc
from tests.support.processes import serving
from tests.support.requests import infer_request, probabilities


def _model_file(demo_registry: Path) -> Path:
    registry = FileRegistry(demo_registry)
    return registry.fetch(registry.get_version("churn", "1"))


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if p.is_file())


async def _answers_like_onnxruntime(
    folder: Path, model: str, demo_registry: Path, tmp_path: Path
) -> None:
    x = load_holdout(demo_registry, "churn", "1").X[:4].astype(np.float32)
    session = ort.InferenceSession(
        str(_model_file(demo_registry)), providers=["CPUExecutionProvider"]
    )
    expected = session.run(["probabilities"], {"input": x})[0]
    config = tmp_path / "batchline.toml"
    config.write_text(f'[server]\nregistry_cache_dir = "{tmp_path / "cache"}"\n')
    with serving(
        folder, tmp_path, "--config", str(config), "--model", f"{model}@production"
    ) as server:
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            reply = await stub.ModelInfer(infer_request(x, model), timeout=30)
    assert reply.model_name == model
    np.testing.assert_allclose(probabilities(reply), expected, rtol=1e-6, atol=1e-6)
    assert "model files, not a registry: imported" in server.log.read_text()
    # The folder itself is untouched (read-only in KServe): the registry is in the cache.
    assert _files(folder) == ["model.onnx"]


async def test_a_folder_of_one_model_onnx_is_served_under_the_model_name(
    demo_registry: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "mnt-models"
    folder.mkdir()
    shutil.copyfile(_model_file(demo_registry), folder / "model.onnx")
    await _answers_like_onnxruntime(folder, "my-isvc", demo_registry, tmp_path)


async def test_a_triton_model_repository_is_served_without_an_import_step(
    demo_registry: Path, tmp_path: Path
) -> None:
    repo = tmp_path / "repo"
    (repo / "scorer" / "1").mkdir(parents=True)
    shutil.copyfile(_model_file(demo_registry), repo / "scorer" / "1" / "model.onnx")
    await _answers_like_onnxruntime(repo, "scorer", demo_registry, tmp_path)
