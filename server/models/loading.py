"""Loading one model version: registry -> verified artifact -> session -> warm-up -> batcher,
breaker, feature view and metric series. Synchronous: the manager runs it in an executor."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import numpy as np

from registry_client import ModelVersion, Registry
from registry_client.errors import AttachmentNotFound, RegistryError
from server.batching import DynamicBatcher
from server.breaker import CircuitBreaker
from server.clock import Clock
from server.config import ModelSettings
from server.errors import FailedPrecondition
from server.features.view import FeatureView
from server.models.served import ServedModel
from server.observability.metrics import Metrics
from server.observability.stats import ModelStats
from server.runtime import OnnxModel, RuntimeOptions
from server.types import ModelKey, ModelSignature, TensorSpec, Trace, Tracer

log = logging.getLogger("server.models")


class _BatchTraces:
    """The batcher's tracing hook: each sampled request's queue wait, and a batch span linked
    to every request it served (server/observability/tracing.Tracing)."""

    def __init__(self, tracing: Tracer, model: str, version: str) -> None:
        self._tracing = tracing
        self._model = model
        self._version = version

    def batch(
        self,
        traces: Sequence[object],
        enqueued: Sequence[float],
        started: float,
        finished: float,
        rows: int,
        ok: bool,
    ) -> None:
        to_ns = self._tracing.epoch_ns
        start, end = to_ns(started), to_ns(finished)
        linked: list[Trace | None] = []
        for trace, queued_at in zip(traces, enqueued, strict=True):
            sampled: Trace | None = trace  # type: ignore[assignment]
            if sampled is not None:
                sampled.child("queue_wait", to_ns(queued_at), start)
            linked.append(sampled)
        self._tracing.record_batch(self._model, self._version, rows, start, end, ok, linked)


def _scores_and_labels(signature: ModelSignature) -> tuple[int | None, int | None]:
    """Positions of a classifier's scores (first float output) and labels (first integer one)."""
    scores = labels = None
    for i, spec in enumerate(signature.outputs):
        if scores is None and spec.datatype in ("FP32", "FP64", "FP16"):
            scores = i
        elif labels is None and spec.datatype.startswith(("INT", "UINT")):
            labels = i
    return scores, labels


def _static_fallback(settings: ModelSettings, signature: ModelSignature) -> list[np.ndarray] | None:
    """One row of every output from `fallback_outputs`, checked against the signature."""
    if settings.fallback != "static":
        return None
    rows = []
    given = dict(settings.fallback_outputs)
    key = f"models.{settings.name}.fallback_outputs"
    for spec in signature.outputs:
        if spec.name not in given:
            raise FailedPrecondition(f"{key}: no value for output {spec.name}")
        try:
            value = np.asarray(given.pop(spec.name), dtype=spec.dtype)
        except (TypeError, ValueError) as exc:
            raise FailedPrecondition(f"{key}.{spec.name}: not {spec.datatype}: {exc}") from exc
        want = spec.shape[1:]
        if len(value.shape) != len(want) or any(
            w not in (-1, v) for w, v in zip(want, value.shape, strict=True)
        ):
            raise FailedPrecondition(
                f"{key}.{spec.name}: one row has shape {list(value.shape)}; "
                f"the output's row shape is {list(want)}"
            )
        rows.append(value)
    if given:
        raise FailedPrecondition(f"{key}: unknown output {sorted(given)[0]}")
    return rows


def _check_signature(mv: ModelVersion, runtime: OnnxModel) -> None:
    """The registry's recorded signature must match the graph that was actually loaded."""
    graph = runtime.signature
    for recorded in mv.signature.inputs:
        spec = graph.input(recorded.name)
        if spec is None or spec.datatype != recorded.datatype:
            raise FailedPrecondition(
                f"{mv.name} version {mv.version}: the registry lists input {recorded.name} "
                f"{recorded.datatype}, the ONNX graph has "
                f"{', '.join(f'{s.name} {s.datatype}' for s in graph.inputs)}"
            )


class VersionLoader:
    """Builds the ServedModel of one registry version; the manager decides when, and swaps."""

    def __init__(
        self,
        registry: Registry,
        clock: Clock,
        metrics: Metrics,
        *,
        runtime_factory: Callable[[str, RuntimeOptions], OnnxModel] = OnnxModel,
        tracing: Tracer | None = None,
    ) -> None:
        self._registry = registry
        self._clock = clock
        self._metrics = metrics
        self._runtime_factory = runtime_factory
        self._tracing = tracing

    def resolve(self, ref: str) -> ModelVersion:
        try:
            return self._registry.resolve(ref)
        except RegistryError as exc:
            raise FailedPrecondition(f"cannot resolve {ref}: {exc}") from exc

    def load(self, settings: ModelSettings, mv: ModelVersion) -> ServedModel:
        try:
            path = self._registry.fetch(mv)
        except RegistryError as exc:
            raise FailedPrecondition(f"cannot fetch {mv.name} version {mv.version}: {exc}") from exc
        options = RuntimeOptions(
            intra_op_threads=settings.intra_op_threads,
            inter_op_threads=settings.inter_op_threads,
            providers=settings.providers,
            execution=settings.execution,
            instances=settings.instances,
        )
        runtime = self._runtime_factory(str(path), options)
        _check_signature(mv, runtime)
        if not runtime.batchable:
            raise FailedPrecondition(
                f"{mv.name} version {mv.version}: every input and output needs a variable first "
                "(batch) dimension to be served"
            )
        timing = runtime.warm_up(settings.max_batch_size)
        inline = runtime.runs_inline()
        executor = None if inline else runtime.start_executor(mv.name)
        key = ModelKey(mv.name, mv.version)
        stats = ModelStats()
        alias = settings.ref.split("@", 1)[1] if "@" in settings.ref else None
        if alias is not None and alias.isdigit():
            alias = None
        batcher_ref: list[DynamicBatcher] = []
        observer = self._metrics.for_model(
            mv.name,
            mv.version,
            stats,
            lambda: float(batcher_ref[0].queued_rows) if batcher_ref else 0.0,
        )
        batcher = DynamicBatcher(
            str(key),
            runtime.run,
            settings.batching,
            self._clock,
            executor=executor,
            observer=observer,
            tracer=_BatchTraces(self._tracing, mv.name, mv.version) if self._tracing else None,
        )
        batcher_ref.append(batcher)
        self._metrics.model_info.labels(mv.name, mv.version, alias or "", mv.sha256).set(1)
        log.info(
            "loaded %s version %s (%s): batch-1 run %.1f us, batch-%d run %.1f us, %s",
            mv.name,
            mv.version,
            settings.ref,
            timing.batch1_s * 1e6,
            timing.max_batch,
            timing.batch_max_s * 1e6,
            "inline on the event loop" if inline else f"in {settings.instances} executor thread(s)",
        )
        view, entity_signature, feature_input = self._feature_view(mv, runtime.signature)
        breaker = CircuitBreaker(
            f"model:{mv.name}:{mv.version}",
            settings.breaker,
            on_transition=self._metrics.breaker_transition,
        )
        self._metrics.breaker_created(breaker.name)
        score_output, label_output = _scores_and_labels(runtime.signature)
        return ServedModel(
            score_output=score_output,
            label_output=label_output,
            breaker=breaker,
            static_fallback=_static_fallback(settings, runtime.signature),
            view=view,
            entity_signature=entity_signature,
            combined_signature=(
                None
                if entity_signature is None
                else ModelSignature(
                    inputs=(*runtime.signature.inputs, *entity_signature.inputs),
                    outputs=runtime.signature.outputs,
                )
            ),
            feature_input=feature_input,
            key=key,
            alias=alias,
            settings=settings,
            version_info=mv,
            runtime=runtime,
            batcher=batcher,
            observer=observer,
            stats=stats,
            output_index={o.name: i for i, o in enumerate(runtime.signature.outputs)},
            inline=inline,
        )

    def _feature_view(
        self, mv: ModelVersion, signature: ModelSignature
    ) -> tuple[FeatureView | None, ModelSignature | None, str]:
        """The version's feature view (registry attachment feature_view.json), if it has one."""
        attachment = getattr(self._registry, "attachment", None)
        if attachment is None:
            return None, None, ""
        try:
            path = attachment(mv.name, mv.version, "feature_view.json")
        except AttachmentNotFound:
            return None, None, ""  # a model without a feature view
        except RegistryError as exc:
            # Present but failing its check (tampered, unlisted): never serve without it.
            raise FailedPrecondition(
                f"{mv.name} version {mv.version}: feature_view.json: {exc}"
            ) from exc
        try:
            view = FeatureView.from_json(path.read_text())
        except (OSError, ValueError, KeyError) as exc:
            raise FailedPrecondition(
                f"{mv.name} version {mv.version}: bad feature_view.json: {exc}"
            ) from exc
        (spec,) = signature.inputs if len(signature.inputs) == 1 else (None,)
        if spec is None or spec.datatype != "FP32" or spec.shape[1:] != (view.width,):
            raise FailedPrecondition(
                f"{mv.name} version {mv.version}: feature view {view.name} has {view.width} "
                f"features; the model needs one FP32 input [-1, {view.width}]"
            )
        entity = TensorSpec(view.entity_key, "BYTES", (-1,))
        return view, ModelSignature(inputs=(entity,), outputs=signature.outputs), spec.name
