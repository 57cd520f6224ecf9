"""The V2 GRPCInferenceService: convert, call the data plane, convert back. No policy here."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc

from server._proto import inference_pb2 as pb
from server._proto import inference_pb2_grpc as pb_grpc
from server.api.codec import Decoder, encode_result, to_message
from server.api.status import abort
from server.api.wire import RawResponseEncoder, stream_reply
from server.clock import Clock
from server.dataplane import DataPlane
from server.errors import ServingError
from server.types import InferResult, Trace, Tracer

log = logging.getLogger(__name__)


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):  # type: ignore[misc]
    """Open Inference Protocol (KServe V2) over gRPC, wire-compatible with Triton's."""

    def __init__(
        self,
        plane: DataPlane,
        clock: Clock,
        *,
        max_tensor_elements: int,
        max_request_id_bytes: int = 256,
        tracing: Tracer | None = None,
    ) -> None:
        self._plane = plane
        self._clock = clock
        # None when tracing is off: one check per request.
        self._tracing = tracing
        self._decoder = Decoder(max_tensor_elements, max_request_id_bytes, "grpc")
        self._wire = RawResponseEncoder()

    # ---- inference ------------------------------------------------------------------------

    async def _infer(
        self, request: Any, remaining: float | None, trace: Trace | None = None
    ) -> Any:
        plane = self._plane
        served = plane.resolve(request.model_name, request.model_version)
        deadline = None if remaining is None else self._clock.now() + remaining
        decoded = self._decoder.decode(served, request, request.model_version or None, deadline)
        decoded.trace = trace
        result = await plane.infer(served, decoded)
        if trace is None:
            return self._encode(result)
        began = time.time_ns()
        encoded = self._encode(result)
        trace.child("encode", began, time.time_ns())
        return encoded

    def _encode(self, result: InferResult) -> Any:
        if result.raw_output:
            try:
                return self._wire.encode(result)
            except KeyError:
                pass  # BYTES outputs or parameters: the general encoder below
        return encode_result(result)

    async def ModelInfer(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        if self._tracing is None:
            try:
                return await self._infer(request, context.time_remaining())
            except ServingError as exc:
                await abort(context, exc)
        return await self._traced(request, context)

    async def _traced(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        """ModelInfer with a span (continuing the caller's traceparent) when sampled."""
        assert self._tracing is not None
        trace = self._tracing.start_request(
            "ModelInfer",
            context.invocation_metadata(),
            {
                "rpc.system": "grpc",
                "batchline.model": request.model_name,
                "batchline.request_id": request.id,
            },
        )
        try:
            reply = await self._infer(request, context.time_remaining(), trace)
        except ServingError as exc:
            if trace is not None:
                trace.end(exc.kind.name, exc.message)
            await abort(context, exc)
        except asyncio.CancelledError:
            if trace is not None:
                trace.end("CANCELLED")
            raise
        except BaseException:
            if trace is not None:
                trace.end("INTERNAL")
            raise
        if trace is not None:
            trace.end()
        return reply

    async def ModelStreamInfer(
        self, request_iterator: AsyncIterator[Any], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[Any]:
        """Requests on one stream run concurrently (so they can share batches); each reply
        carries its request's id, and a failed request answers error_message, not the stream."""
        replies: asyncio.Queue[Any] = asyncio.Queue()
        pending: set[asyncio.Task[None]] = set()
        done = object()

        async def answer(request: Any) -> None:
            try:
                response = await self._infer(request, None)
                replies.put_nowait(
                    stream_reply(response)
                    if response.__class__ is bytes
                    else pb.ModelStreamInferResponse(infer_response=response)
                )
            except ServingError as exc:
                replies.put_nowait(
                    pb.ModelStreamInferResponse(
                        error_message=f"{exc.kind.name}: {exc.message}",
                        infer_response=pb.ModelInferResponse(
                            model_name=request.model_name,
                            model_version=request.model_version,
                            id=request.id,
                        ),
                    )
                )

        # Bound once: asyncio.create_task looks the loop up per call (a getpid() in 3.11).
        loop = asyncio.get_running_loop()

        async def read() -> None:
            try:
                async for request in request_iterator:
                    task = loop.create_task(answer(request))
                    pending.add(task)
                    task.add_done_callback(pending.discard)
                if pending:
                    await asyncio.gather(*pending)
            finally:
                replies.put_nowait(done)

        reader = loop.create_task(read())
        try:
            while True:
                reply = await replies.get()
                if reply is done:
                    break
                yield reply
            await reader
        finally:
            if not reader.done():
                reader.cancel()
            for task in list(pending):
                task.cancel()

    # ---- health and metadata ---------------------------------------------------------------

    async def ServerLive(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return pb.ServerLiveResponse(live=self._plane.live())

    async def ServerReady(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return pb.ServerReadyResponse(ready=self._plane.ready())

    async def ModelReady(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            ready = self._plane.model_ready(request.name, request.version)
        except ServingError:
            ready = False  # Triton answers ready=false for a model it does not serve
        return pb.ModelReadyResponse(ready=ready)

    async def ServerMetadata(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return to_message(self._plane.server_metadata(), pb.ServerMetadataResponse)

    async def ModelMetadata(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            found = self._plane.model_metadata(request.name, request.version)
        except ServingError as exc:
            await abort(context, exc)
        return to_message(found, pb.ModelMetadataResponse)

    async def ModelConfig(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            config = self._plane.model_config(request.name, request.version)
        except ServingError as exc:
            await abort(context, exc)
        return to_message({"config": config}, pb.ModelConfigResponse)

    async def ModelStatistics(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            stats = self._plane.model_statistics(request.name, request.version)
        except ServingError as exc:
            await abort(context, exc)
        return to_message(stats, pb.ModelStatisticsResponse)

    async def RepositoryModelLoad(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        """Triton's load: re-resolve the model's ref in the registry and swap if it moved."""
        try:
            await self._plane.reload(request.model_name)
        except ServingError as exc:
            await abort(context, exc)
        return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            self._plane.unload(request.model_name)
        except ServingError as exc:
            await abort(context, exc)
        return pb.RepositoryModelUnloadResponse()

    async def RepositoryIndex(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return to_message({"models": self._plane.repository_index()}, pb.RepositoryIndexResponse)
