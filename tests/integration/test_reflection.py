"""gRPC server reflection on a real `batchline serve`: what grpcurl and ghz do without --proto
(list the services, fetch their descriptors, build a request from them alone and call it)."""

from __future__ import annotations

import grpc
import numpy as np
from google.protobuf import descriptor_pool, message_factory
from grpc_reflection.v1alpha import reflection_pb2
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from tests.support.processes import ServerProcess

TIMEOUT = 30.0


def test_reflection_lists_the_services_and_describes_model_infer(
    server_process: ServerProcess,
) -> None:
    with grpc.insecure_channel(server_process.address) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        services = set(database.get_services())
        assert {
            "inference.GRPCInferenceService",
            "batchline.admin.v1.AdminService",
            "grpc.health.v1.Health",
            "grpc.reflection.v1alpha.ServerReflection",
        } <= services
        # A pool built from reflection alone, as grpcurl builds one: no generated code.
        pool = descriptor_pool.DescriptorPool(database)
        service = pool.FindServiceByName("inference.GRPCInferenceService")
        method = service.methods_by_name["ModelInfer"]
        request_type = message_factory.GetMessageClass(method.input_type)
        reply_type = message_factory.GetMessageClass(method.output_type)
        request = request_type(model_name="churn")
        tensor = request.inputs.add(name="input", datatype="FP32", shape=[1, 15])
        assert tensor.name == "input"
        request.raw_input_contents.append(np.zeros((1, 15), np.float32).tobytes())
        call = channel.unary_unary(
            "/inference.GRPCInferenceService/ModelInfer",
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=reply_type.FromString,
        )
        reply = call(request, timeout=TIMEOUT)
        assert reply.model_name == "churn"
        assert [o.name for o in reply.outputs] == ["label", "probabilities"]


def test_reflection_answers_on_v1_too(server_process: ServerProcess) -> None:
    """grpcurl asks grpc.reflection.v1 first; its messages are v1alpha's, field for field."""
    with grpc.insecure_channel(server_process.address) as channel:
        call = channel.stream_stream(
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
            request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
        )
        replies = list(
            call(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=TIMEOUT)
        )
    names = {s.name for s in replies[0].list_services_response.service}
    assert "inference.GRPCInferenceService" in names
