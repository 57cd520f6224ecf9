"""The load tester's generated requests are tagged as synthetic unless told they are live."""

from __future__ import annotations

from loadtest.payload import infer_request_for_model
from server._proto import inference_pb2 as pb


def _metadata() -> pb.ModelMetadataResponse:
    meta = pb.ModelMetadataResponse(name="churn")
    meta.inputs.add(name="input", datatype="FP32", shape=[-1, 15])
    return meta


def test_generated_requests_carry_traffic_loadtest_by_default() -> None:
    request = infer_request_for_model(_metadata(), rows=2)
    assert request.parameters["traffic"].string_param == "loadtest"
    assert list(request.inputs[0].shape) == [2, 15]


def test_live_load_is_untagged() -> None:
    request = infer_request_for_model(_metadata(), rows=1, traffic="")
    assert "traffic" not in request.parameters
