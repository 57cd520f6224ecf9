"""The V2 GRPCInferenceService: convert, call the pipeline, convert back. No policy here."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc

from server import __version__
from server._proto import inference_pb2 as pb
from server._proto import inference_pb2_grpc as pb_grpc
from server.api.codec import Limits, decode_request, encode_result
from server.api.status import abort
from server.api.wire import RawResponseEncoder, stream_reply
from server.clock import Clock
from server.control import ControlPlane
from server.errors import InvalidArgument, ServingError
from server.models import ServedModel
from server.pipeline import InferencePipeline

log = logging.getLogger(__name__)

EXTENSIONS = ("model_configuration", "statistics", "model_repository", "binary_tensor_data")
_CONFIG_TYPES = {
    "BOOL": pb.TYPE_BOOL,
    "UINT8": pb.TYPE_UINT8,
    "UINT16": pb.TYPE_UINT16,
    "UINT32": pb.TYPE_UINT32,
    "UINT64": pb.TYPE_UINT64,
    "INT8": pb.TYPE_INT8,
    "INT16": pb.TYPE_INT16,
    "INT32": pb.TYPE_INT32,
    "INT64": pb.TYPE_INT64,
    "FP16": pb.TYPE_FP16,
    "FP32": pb.TYPE_FP32,
    "FP64": pb.TYPE_FP64,
    "BYTES": pb.TYPE_STRING,
}


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):  # type: ignore[misc]
    """Open Inference Protocol (KServe V2) over gRPC, wire-compatible with Triton's."""

    def __init__(
        self,
        pipeline: InferencePipeline,
        clock: Clock,
        *,
        max_tensor_elements: int,
        max_request_id_bytes: int = 256,
        is_ready: Callable[[], bool],
        control: ControlPlane | None = None,
        tracing: Any = None,
    ) -> None:
        # Where RepositoryModelLoad goes (every worker and replica follows it); None: this
        # process's models alone.
        self._control = control
        # server/observability/tracing.Tracing when tracing is on; None costs one check.
        self._tracing = tracing
        self._pipeline = pipeline
        self._clock = clock
        self._max_elements = max_tensor_elements
        self._max_id_bytes = max_request_id_bytes
        self._is_ready = is_ready
        self._wire = RawResponseEncoder()
        # When the last inference call arrived (the drain waits for a quiet moment).
        self.last_call = clock.now()

    # ---- inference ------------------------------------------------------------------------

    async def _infer(self, request: Any, remaining: float | None, trace: Any = None) -> Any:
        if not request.model_name:
            raise InvalidArgument("model_name is required")
        served = self._pipeline.resolve(request.model_name, request.model_version)
        limits = served.decode_state
        if limits is None:
            limits = served.decode_state = Limits(
                served.max_batch_size, self._max_elements, self._max_id_bytes
            )
        deadline = None if remaining is None else self._clock.now() + remaining
        entity_signature = served.entity_signature
        signature = served.runtime.signature
        if entity_signature is not None:
            key = entity_signature.inputs[0].name
            tensors = request.inputs
            if len(tensors) == 1 and tensors[0].name == key:
                signature = entity_signature  # ids only: the server reads the features
            elif len(tensors) == 2 and (tensors[0].name == key or tensors[1].name == key):
                signature = served.combined_signature or signature  # features win over ids
        try:
            # version None: the caller named no version, so routing (canary) may choose one.
            decoded = decode_request(
                request, signature, limits, request.model_version or None, deadline
            )
        except ServingError as exc:
            served.observer.request_done(0.0, exc.kind.name)
            raise
        decoded.trace = trace
        result = await self._pipeline.infer(served, decoded)
        if trace is None:
            return self._encode(result)
        began = time.time_ns()
        encoded = self._encode(result)
        trace.child("encode", began, time.time_ns())
        return encoded

    def _encode(self, result: Any) -> Any:
        if result.raw_output:
            try:
                return self._wire.encode(result)
            except KeyError:
                pass  # BYTES outputs or parameters: the general encoder below
        return encode_result(result)

    async def ModelInfer(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        self.last_call = self._clock.now()
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
        self.last_call = self._clock.now()
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

        async def read() -> None:
            try:
                async for request in request_iterator:
                    self.last_call = self._clock.now()
                    task = asyncio.create_task(answer(request))
                    pending.add(task)
                    task.add_done_callback(pending.discard)
                if pending:
                    await asyncio.gather(*pending)
            finally:
                replies.put_nowait(done)

        reader = asyncio.create_task(read())
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
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return pb.ServerReadyResponse(ready=self._is_ready())

    async def ModelReady(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            self._pipeline.models.get(request.name, request.version)
        except ServingError:
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=self._is_ready())

    async def ServerMetadata(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return pb.ServerMetadataResponse(
            name="batchline", version=__version__, extensions=list(EXTENSIONS)
        )

    async def _served(
        self, name: str, version: str, context: grpc.aio.ServicerContext
    ) -> ServedModel:
        try:
            if not name:
                raise InvalidArgument("name is required")
            return self._pipeline.models.get(name, version)
        except ServingError as exc:
            await abort(context, exc)
            raise  # unreachable: abort raises

    async def ModelMetadata(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        served = await self._served(request.name, request.version, context)
        sig = served.signature
        versions = [
            m.key.version for m in self._pipeline.models.all() if m.key.name == served.key.name
        ]
        return pb.ModelMetadataResponse(
            name=served.key.name,
            versions=versions,
            platform="onnxruntime_onnx",
            # The feature input only: an entity-keyed model's entity key is in ModelConfig's
            # parameters. Listed here as a second input, it makes clients that fill every input
            # fail (perf_analyzer: "unable to set shape for the input" for a BYTES [-1]).
            inputs=[
                pb.ModelMetadataResponse.TensorMetadata(
                    name=t.name, datatype=t.datatype, shape=t.shape
                )
                for t in sig.inputs
            ],
            outputs=[
                pb.ModelMetadataResponse.TensorMetadata(
                    name=t.name, datatype=t.datatype, shape=t.shape
                )
                for t in sig.outputs
            ],
        )

    async def ModelConfig(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        served = await self._served(request.name, request.version, context)
        s = served.settings
        sig = served.signature
        mv = served.version_info
        config = pb.ModelConfig(
            name=served.key.name,
            platform="onnxruntime_onnx",
            backend="onnxruntime",
            max_batch_size=s.max_batch_size,
            # With max_batch_size > 0, Triton's dims leave out the batch dimension.
            input=[
                pb.ModelInput(
                    name=t.name,
                    data_type=_CONFIG_TYPES.get(t.datatype, pb.TYPE_INVALID),
                    dims=t.shape[1:],
                )
                for t in sig.inputs
            ],
            output=[
                pb.ModelOutput(
                    name=t.name,
                    data_type=_CONFIG_TYPES.get(t.datatype, pb.TYPE_INVALID),
                    dims=t.shape[1:],
                )
                for t in sig.outputs
            ],
            instance_group=[
                pb.ModelInstanceGroup(
                    name=f"{served.key.name}_cpu",
                    count=1 if served.inline else s.instances,
                    kind=pb.ModelInstanceGroup.KIND_CPU,
                )
            ],
        )
        if s.dynamic_batching:
            config.dynamic_batching.CopyFrom(
                pb.ModelDynamicBatching(
                    preferred_batch_size=s.preferred_batch_sizes,
                    max_queue_delay_microseconds=s.max_queue_delay_us,
                    default_queue_policy=pb.ModelQueuePolicy(max_queue_size=s.max_queue_size),
                )
            )
        params = {
            "version": served.key.version,
            "alias": served.alias or "",
            "sha256": mv.sha256,
            "created": mv.created,
            "source": mv.source,
            "execution": "inline" if served.inline else "executor",
            **{f"metric.{k}": f"{v:.6g}" for k, v in mv.metrics.items()},
        }
        view = served.view
        if view is not None:
            # Entity-keyed serving: a request may send `entity_key` (BYTES [-1], one id per
            # row) instead of `feature_input` (the server then reads the features itself), or
            # both (the features are used; the ids route the request and label its drift
            # record). Not among `input`: see ModelMetadata.
            params.update(
                entity_key=view.entity_key,
                entity_key_datatype="BYTES",
                entity_key_shape="[-1]",
                feature_input=served.feature_input,
                feature_view=view.name,
            )
        for key, value in params.items():
            config.parameters[key].string_value = str(value)
        return pb.ModelConfigResponse(config=config)

    async def ModelStatistics(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        if request.name:
            chosen = [await self._served(request.name, request.version, context)]
        else:
            chosen = self._pipeline.models.all()
        response = pb.ModelStatisticsResponse()
        for served in chosen:
            st = served.stats
            entry = response.model_stats.add(
                name=served.key.name,
                version=served.key.version,
                last_inference=st.last_inference_ms,
                inference_count=st.inference_count,
                execution_count=st.execution_count,
            )
            inf = entry.inference_stats
            for field, value in (
                ("success", st.success),
                ("fail", st.fail),
                ("queue", st.queue),
                ("compute_infer", st.compute_infer),
            ):
                getattr(inf, field).count = value.count
                getattr(inf, field).ns = value.ns
            # perf_analyzer requires the three compute counts to agree; batchline times the
            # model call as a whole (compute_infer), so input and output carry the count only.
            inf.compute_input.count = inf.compute_output.count = st.compute_infer.count
            for size in sorted(st.batch_stats):
                per = st.batch_stats[size].compute_infer
                b = entry.batch_stats.add(batch_size=size)
                b.compute_infer.count = per.count
                b.compute_infer.ns = per.ns
        return response

    async def RepositoryModelLoad(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        """Triton's load: re-resolve the model's ref in the registry and swap if it moved."""
        try:
            if self._control is not None:
                await self._control.reload(request.model_name)
            else:
                await self._pipeline.models.reload(request.model_name)
        except ServingError as exc:
            await abort(context, exc)
        return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(
            grpc.StatusCode.FAILED_PRECONDITION,
            f"batchline serves the models it was configured with; '{request.model_name}' "
            "cannot be unloaded at run time (move its alias and reload instead)",
        )

    async def RepositoryIndex(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return pb.RepositoryIndexResponse(
            models=[
                pb.RepositoryIndexResponse.ModelIndex(
                    name=m.key.name, version=m.key.version, state="READY"
                )
                for m in self._pipeline.models.all()
            ]
        )
