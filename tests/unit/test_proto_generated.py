"""The checked-in server/_proto matches proto/, and coexists with tritonclient in one process."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from server._proto import inference_pb2 as pb
from server._proto import inference_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parents[2]


def test_checked_in_generated_code_is_up_to_date_with_proto() -> None:
    pytest.importorskip("grpc_tools", reason="regenerating needs grpcio-tools (the dev extra)")
    result = subprocess.run(
        [sys.executable, "proto/generate.py", "--check"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_service_full_name_is_the_v2_inference_service() -> None:
    service = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    assert service.full_name == "inference.GRPCInferenceService"
    assert "ModelInfer" in service.methods_by_name


def test_grpc_stub_calls_the_v2_method_path() -> None:
    class Channel:
        def __init__(self) -> None:
            self.paths: list[str] = []

        def __getattr__(self, kind: str):  # type: ignore[no-untyped-def]
            def register(path: str, **_: object) -> object:
                self.paths.append(path)
                return object()

            return register

    channel = Channel()
    pb_grpc.GRPCInferenceServiceStub(channel)
    assert "/inference.GRPCInferenceService/ModelInfer" in channel.paths


def test_generated_messages_live_outside_the_default_descriptor_pool() -> None:
    from google.protobuf import descriptor_pool

    assert pb.DESCRIPTOR.pool is not descriptor_pool.Default()


def test_server_request_parses_as_tritonclient_request_in_the_same_process() -> None:
    service_pb2 = pytest.importorskip("tritonclient.grpc.service_pb2")
    request = pb.ModelInferRequest(
        model_name="churn",
        model_version="3",
        id="req-1",
        inputs=[
            pb.ModelInferRequest.InferInputTensor(name="input", datatype="FP32", shape=[2, 15])
        ],
        outputs=[pb.ModelInferRequest.InferRequestedOutputTensor(name="label")],
        raw_input_contents=[b"\x00" * 120],
    )
    request.parameters["priority"].int64_param = 2

    theirs = service_pb2.ModelInferRequest.FromString(request.SerializeToString())

    assert theirs.model_name == "churn"
    assert theirs.model_version == "3"
    assert theirs.id == "req-1"
    assert [(t.name, t.datatype, list(t.shape)) for t in theirs.inputs] == [
        ("input", "FP32", [2, 15])
    ]
    assert [o.name for o in theirs.outputs] == ["label"]
    assert list(theirs.raw_input_contents) == [b"\x00" * 120]
    assert theirs.parameters["priority"].int64_param == 2
    # And back: tritonclient's bytes parse as ours.
    assert pb.ModelInferRequest.FromString(theirs.SerializeToString()) == request
