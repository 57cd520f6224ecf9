"""ModelManager: the served model versions, loaded once from the registry, warmed up, batched.

Lookups by (name, version) are dictionary reads on the request path; loading happens at start-up
(and, later, on reload) away from it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass

from registry_client import ModelVersion, Registry
from registry_client.errors import RegistryError
from server.batching import BatchPolicy, DynamicBatcher
from server.clock import Clock
from server.config import ModelSettings
from server.errors import FailedPrecondition, NotFound
from server.observability.metrics import Metrics, ModelObserver
from server.observability.stats import ModelStats
from server.runtime import OnnxModel, RuntimeOptions
from server.types import ModelKey, ModelSignature

log = logging.getLogger(__name__)


@dataclass(eq=False)
class ServedModel:
    """One loaded, warmed-up model version with its batcher and statistics."""

    key: ModelKey
    alias: str | None
    settings: ModelSettings
    version_info: ModelVersion
    runtime: OnnxModel
    batcher: DynamicBatcher
    observer: ModelObserver
    stats: ModelStats
    output_index: dict[str, int]
    inline: bool

    @property
    def signature(self) -> ModelSignature:
        return self.runtime.signature

    @property
    def max_batch_size(self) -> int:
        return self.settings.max_batch_size


class ModelNotServed(NotFound):
    pass


def _policy(settings: ModelSettings) -> BatchPolicy:
    return BatchPolicy(
        max_batch_size=settings.max_batch_size,
        max_queue_delay_s=settings.max_queue_delay_us / 1e6,
        preferred_batch_sizes=settings.preferred_batch_sizes,
        max_queue_size=settings.max_queue_size or None,
        instances=settings.instances,
        enabled=settings.dynamic_batching,
    )


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


class ModelManager:
    """Owns the served model versions: load (registry -> verified artifact -> session -> warm-up
    -> batcher), look up, unload. Each model name has a default version (its alias's)."""

    def __init__(
        self,
        registry: Registry,
        clock: Clock,
        metrics: Metrics,
        *,
        runtime_factory: Callable[[str, RuntimeOptions], OnnxModel] = OnnxModel,
    ) -> None:
        self._registry = registry
        self._clock = clock
        self._metrics = metrics
        self._runtime_factory = runtime_factory
        self._versions: dict[str, dict[str, ServedModel]] = {}
        self._default: dict[str, ServedModel] = {}

    def names(self) -> list[str]:
        return list(self._default)

    def all(self) -> list[ServedModel]:
        return [m for versions in self._versions.values() for m in versions.values()]

    def get(self, name: str, version: str | None = None) -> ServedModel:
        """The served version (the default one when `version` is empty); NotFound names what's missing."""
        if not version:
            served = self._default.get(name)
            if served is None:
                raise ModelNotServed(self._unknown_model(name))
            return served
        versions = self._versions.get(name)
        if versions is None:
            raise ModelNotServed(self._unknown_model(name))
        served = versions.get(version)
        if served is None:
            raise ModelNotServed(
                f"model '{name}' has no served version '{version}' (served: {', '.join(versions)})"
            )
        return served

    def _unknown_model(self, name: str) -> str:
        known = ", ".join(sorted(self._default)) or "none"
        return f"unknown model '{name}' (served: {known})"

    async def load(self, settings: ModelSettings) -> ServedModel:
        """Resolve, fetch, load and warm up one model; make it its name's default version."""
        loop = asyncio.get_running_loop()
        served = await loop.run_in_executor(None, self._load_sync, settings)
        if served.runtime.executor is None and not served.inline:
            served.runtime.start_executor(served.key.name)
        self._versions.setdefault(served.key.name, {})[served.key.version] = served
        self._default[served.key.name] = served
        return served

    def _load_sync(self, settings: ModelSettings) -> ServedModel:
        try:
            mv = self._registry.resolve(settings.ref)
            path = self._registry.fetch(mv)
        except RegistryError as exc:
            raise FailedPrecondition(f"cannot load {settings.ref}: {exc}") from exc
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
            _policy(settings),
            self._clock,
            executor=executor,
            observer=observer,
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
        return ServedModel(
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

    async def drain(self) -> None:
        await asyncio.gather(*(m.batcher.drain() for m in self.all()))

    def close(self) -> None:
        for served in self.all():
            served.batcher.close()
            served.runtime.close()
