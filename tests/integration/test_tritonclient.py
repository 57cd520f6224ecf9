"""Acceptance with the real, unmodified `tritonclient` (2.73): batchline speaks Triton's
`inference.GRPCInferenceService` well enough for Triton's own Python clients.

Runs against the shared `server_process` subprocess, so the sync client cannot deadlock with a
server on the test's event loop. Values are checked against onnxruntime run in this process on
the same artifact and against scikit-learn's predict_proba recorded in the holdout.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as triton
import tritonclient.grpc.aio as triton_aio
from tritonclient.grpc import model_config_pb2, service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from registry_client import FileRegistry
from registry_client.demo import Holdout, load_holdout
from tests.support.processes import ServerProcess

MODELS = ("churn", "churn_mlp")  # both served at their production version, 1
TIMEOUT = 10.0


@pytest.fixture(scope="module")
def client(server_process: ServerProcess) -> Iterator[triton.InferenceServerClient]:
    with triton.InferenceServerClient(url=server_process.address) as c:
        yield c


@pytest.fixture(scope="module")
def holdouts(demo_registry: Path) -> dict[str, Holdout]:
    return {name: load_holdout(demo_registry, name, "1") for name in MODELS}


@pytest.fixture(scope="module")
def sessions(demo_registry: Path) -> dict[str, ort.InferenceSession]:
    registry = FileRegistry(demo_registry)
    return {
        name: ort.InferenceSession(
            str(registry.fetch(registry.get_version(name, "1"))), providers=["CPUExecutionProvider"]
        )
        for name in MODELS
    }


def triton_input(rows: np.ndarray) -> triton.InferInput:
    tensor = triton.InferInput("input", list(rows.shape), "FP32")
    tensor.set_data_from_numpy(np.ascontiguousarray(rows, dtype=np.float32))
    return tensor


def assert_matches_onnxruntime_and_sklearn(
    name: str,
    probabilities: np.ndarray,
    labels: np.ndarray,
    rows: slice,
    holdouts: dict[str, Holdout],
    sessions: dict[str, ort.InferenceSession],
) -> None:
    holdout = holdouts[name]
    ort_labels, ort_probabilities = sessions[name].run(
        ["label", "probabilities"], {"input": holdout.X[rows]}
    )
    assert probabilities.dtype == np.float32
    assert labels.dtype == np.int64
    np.testing.assert_allclose(probabilities, ort_probabilities, atol=1e-5, rtol=0)
    np.testing.assert_allclose(probabilities, holdout.probabilities[rows], atol=1e-5, rtol=0)
    np.testing.assert_array_equal(labels, ort_labels)
    np.testing.assert_array_equal(labels, holdout.labels[rows])


# ---- health, metadata, configuration, statistics ---------------------------------------------


def test_server_and_models_are_live_and_ready(client: triton.InferenceServerClient) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    assert all(client.is_model_ready(name) for name in MODELS)
    assert not client.is_model_ready("no_such_model")


@pytest.mark.parametrize("name", MODELS)
def test_model_metadata_has_a_minus_one_batch_dim_and_v2_datatypes(
    client: triton.InferenceServerClient, name: str
) -> None:
    meta = client.get_model_metadata(name)

    assert meta.name == name
    assert "1" in meta.versions
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [
        ("input", "FP32", [-1, 15])
    ]
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.outputs] == [
        ("label", "INT64", [-1]),
        ("probabilities", "FP32", [-1, 2]),
    ]


@pytest.mark.parametrize("name", MODELS)
def test_model_config_has_max_batch_size_dims_without_batch_and_dynamic_batching(
    client: triton.InferenceServerClient, name: str
) -> None:
    config = client.get_model_config(name).config

    assert config.max_batch_size == 64
    assert [(i.name, i.data_type, list(i.dims)) for i in config.input] == [
        ("input", model_config_pb2.TYPE_FP32, [15])
    ]
    assert [(o.name, o.data_type, list(o.dims)) for o in config.output] == [
        ("label", model_config_pb2.TYPE_INT64, []),
        ("probabilities", model_config_pb2.TYPE_FP32, [2]),
    ]
    assert config.HasField("dynamic_batching")


def test_model_statistics_grow_with_inferences(
    client: triton.InferenceServerClient, holdouts: dict[str, Holdout]
) -> None:
    def stats() -> service_pb2.ModelStatistics:
        (entry,) = client.get_inference_statistics("churn_mlp").model_stats
        return entry

    before = stats()
    for start in (0, 3, 9):
        client.infer("churn_mlp", [triton_input(holdouts["churn_mlp"].X[start : start + 3])])
    after = stats()

    assert (after.name, after.version) == ("churn_mlp", "1")
    assert after.inference_count - before.inference_count == 9  # rows
    assert 1 <= after.execution_count - before.execution_count <= 3  # batches
    assert after.inference_stats.success.count - before.inference_stats.success.count == 3
    assert after.last_inference > 0


# ---- inference ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", MODELS)
def test_binary_infer_matches_onnxruntime_and_scikit_learn_on_the_holdout(
    client: triton.InferenceServerClient,
    holdouts: dict[str, Holdout],
    sessions: dict[str, ort.InferenceSession],
    name: str,
) -> None:
    total = len(holdouts[name].X)
    for start in range(0, total, 64):
        rows = slice(start, min(start + 64, total))
        result = client.infer(name, [triton_input(holdouts[name].X[rows])])

        assert_matches_onnxruntime_and_sklearn(
            name,
            result.as_numpy("probabilities"),
            result.as_numpy("label"),
            rows,
            holdouts,
            sessions,
        )


@pytest.mark.parametrize("name", MODELS)
def test_typed_contents_infer_matches_onnxruntime_and_scikit_learn(
    server_process: ServerProcess,
    holdouts: dict[str, Holdout],
    sessions: dict[str, ort.InferenceSession],
    name: str,
) -> None:
    """tritonclient 2.73's gRPC InferInput always sends raw bytes (no binary_data switch), so
    the typed `contents` path is driven with Triton's own generated messages and stub."""
    rows = slice(100, 140)
    request = service_pb2.ModelInferRequest(model_name=name, id="typed")
    tensor = request.inputs.add(name="input", datatype="FP32", shape=[40, 15])
    tensor.contents.fp32_contents.extend(holdouts[name].X[rows].ravel().tolist())

    with grpc.insecure_channel(server_process.address) as channel:
        response = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
            request, timeout=TIMEOUT
        )

    assert not response.raw_output_contents  # answered in the form it was asked
    by_name = {o.name: o for o in response.outputs}
    assert (by_name["label"].datatype, list(by_name["label"].shape)) == ("INT64", [40])
    assert (by_name["probabilities"].datatype, list(by_name["probabilities"].shape)) == (
        "FP32",
        [40, 2],
    )
    probabilities = np.array(
        by_name["probabilities"].contents.fp32_contents, dtype=np.float32
    ).reshape(40, 2)
    labels = np.array(by_name["label"].contents.int64_contents, dtype=np.int64)
    assert_matches_onnxruntime_and_sklearn(name, probabilities, labels, rows, holdouts, sessions)


def test_requesting_only_probabilities_returns_only_probabilities(
    client: triton.InferenceServerClient, holdouts: dict[str, Holdout]
) -> None:
    result = client.infer(
        "churn",
        [triton_input(holdouts["churn"].X[:4])],
        outputs=[triton.InferRequestedOutput("probabilities")],
    )

    assert [o.name for o in result.get_response().outputs] == ["probabilities"]
    assert result.as_numpy("probabilities").shape == (4, 2)
    assert result.as_numpy("label") is None


def test_request_id_is_echoed(
    client: triton.InferenceServerClient, holdouts: dict[str, Holdout]
) -> None:
    result = client.infer("churn", [triton_input(holdouts["churn"].X[:1])], request_id="req-7f3a")

    response = result.get_response()
    assert (response.id, response.model_name, response.model_version) == ("req-7f3a", "churn", "1")


def test_unknown_model_raises_not_found_through_the_client(
    client: triton.InferenceServerClient, holdouts: dict[str, Holdout]
) -> None:
    with pytest.raises(InferenceServerException) as err:
        client.infer("no_such_model", [triton_input(holdouts["churn"].X[:1])])

    assert err.value.status() == "StatusCode.NOT_FOUND"
    assert "no_such_model" in err.value.message()


async def test_asyncio_client_infers_with_ids_and_matching_values(
    server_process: ServerProcess,
    holdouts: dict[str, Holdout],
    sessions: dict[str, ort.InferenceSession],
) -> None:
    async with triton_aio.InferenceServerClient(url=server_process.address) as aio_client:
        assert await aio_client.is_server_live()
        assert await aio_client.is_server_ready()
        meta = await aio_client.get_model_metadata("churn_mlp")
        assert list(meta.inputs[0].shape) == [-1, 15]

        slices = [slice(8 * i, 8 * i + 1 + i % 5) for i in range(12)]
        results = await asyncio.gather(
            *(
                aio_client.infer(
                    "churn_mlp",
                    [triton_input(holdouts["churn_mlp"].X[rows])],
                    request_id=f"aio-{i}",
                )
                for i, rows in enumerate(slices)
            )
        )
        only = await aio_client.infer(
            "churn_mlp",
            [triton_input(holdouts["churn_mlp"].X[:2])],
            outputs=[triton_aio.InferRequestedOutput("probabilities")],
        )

    for i, (rows, result) in enumerate(zip(slices, results, strict=True)):
        assert result.get_response().id == f"aio-{i}"
        assert_matches_onnxruntime_and_sklearn(
            "churn_mlp",
            result.as_numpy("probabilities"),
            result.as_numpy("label"),
            rows,
            holdouts,
            sessions,
        )
    assert [o.name for o in only.get_response().outputs] == ["probabilities"]


def test_stream_answers_every_request_id_once_with_its_own_rows(
    client: triton.InferenceServerClient,
    holdouts: dict[str, Holdout],
    sessions: dict[str, ort.InferenceSession],
) -> None:
    sent = {f"s{i}": slice(10 * i, 10 * i + 1 + i % 4) for i in range(16)}
    answers: list[tuple[str, triton.InferResult | None, InferenceServerException | None]] = []
    arrived = threading.Condition()

    def callback(result: triton.InferResult | None, error: InferenceServerException | None) -> None:
        with arrived:
            answers.append((result.get_response().id if result else "", result, error))
            arrived.notify_all()

    client.start_stream(callback=callback)
    try:
        for request_id, rows in sent.items():
            client.async_stream_infer(
                "churn_mlp", [triton_input(holdouts["churn_mlp"].X[rows])], request_id=request_id
            )
        with arrived:
            assert arrived.wait_for(lambda: len(answers) >= len(sent), timeout=TIMEOUT)
    finally:
        client.stop_stream()

    assert [error for _, _, error in answers] == [None] * len(sent)
    assert sorted(request_id for request_id, _, _ in answers) == sorted(sent)
    for request_id, result, _ in answers:
        assert result is not None
        assert_matches_onnxruntime_and_sklearn(
            "churn_mlp",
            result.as_numpy("probabilities"),
            result.as_numpy("label"),
            sent[request_id],
            holdouts,
            sessions,
        )
