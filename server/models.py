"""ModelManager: the served model versions, loaded once from the registry, warmed up, batched.

Lookups by (name, version) are dictionary reads on the request path; loading happens at start-up
(and, later, on reload) away from it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from registry_client import ModelVersion, Registry
from registry_client.errors import AttachmentNotFound, RegistryError
from registry_client.refs import parse_ref
from server.batching import BatchPolicy, DynamicBatcher
from server.breaker import CircuitBreaker
from server.clock import Clock
from server.config import ModelSettings
from server.errors import FailedPrecondition, InvalidArgument, NotFound, ServingError
from server.features.view import FeatureView
from server.observability.metrics import Metrics, ModelObserver
from server.observability.stats import ModelStats
from server.routing import Route, ShadowSpec
from server.runtime import OnnxModel, RuntimeOptions
from server.shadow.mirror import ShadowMirror
from server.shadow.pairs import ShadowPair
from server.types import ModelKey, ModelSignature, TensorSpec

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
    # Entity-keyed serving: the version's feature view, the signature of a request that sends
    # entity ids instead of features, and the model input the features fill.
    view: FeatureView | None = None
    entity_signature: ModelSignature | None = None
    # The feature input and the entity key together: a request may send both (the features are
    # used, the ids only route and label it), which is what clients that fill every input the
    # metadata lists (perf_analyzer, tritonclient's generic tools) do.
    combined_signature: ModelSignature | None = None
    feature_input: str = ""
    breaker: CircuitBreaker = field(default_factory=lambda: CircuitBreaker("unset"))
    # Which outputs are a classifier's scores (first float) and labels (first integer):
    # derived once at load for the drift records and shadow pairs.
    score_output: int | None = None
    label_output: int | None = None
    # One row of each output, in signature order, answered while the breaker is open.
    static_fallback: list[np.ndarray] | None = None
    in_flight: int = 0
    # The transport's per-version decode state (server/api/codec.Limits and its plans): kept
    # here so it is released with the version, and found with one attribute read.
    decode_state: Any = None

    @property
    def signature(self) -> ModelSignature:
        return self.runtime.signature

    @property
    def max_batch_size(self) -> int:
        return self.settings.max_batch_size


class ModelNotServed(NotFound):
    pass


@dataclass(frozen=True)
class ReloadOutcome:
    model: str
    version: str
    previous_version: str
    changed: bool
    message: str


@dataclass(eq=False)
class ModelSlot:
    """One served model name: its configured ref, the live version and its reload history."""

    settings: ModelSettings
    current: ServedModel
    loaded_at_ms: int
    last_check_ms: int = 0
    state: str = "READY"
    last_error: str = ""
    reloads: int = 0
    failed_reloads: int = 0
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    retiring: set[asyncio.Task[None]] = field(default_factory=set)
    # The version that answers while the current one's breaker is open (fallback = "previous").
    previous: ServedModel | None = None
    # Canary and shadow versions, and the mirror that feeds the shadows.
    route: Route | None = None
    mirror: ShadowMirror[ShadowPair] | None = None


class LoopLoad:
    """How busy the event loop's thread is: its CPU time over wall time, sampled every
    `period_s` on the loop itself, as a moving average (the mirror's "no spare CPU" signal;
    loop lag barely moves on a saturated loop of many short callbacks)."""

    def __init__(self, period_s: float = 0.05) -> None:
        self._period = period_s
        self.busy = 0.0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._probe())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    async def _probe(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            wall, cpu = loop.time(), time.thread_time()
            await asyncio.sleep(self._period)
            elapsed = loop.time() - wall
            if elapsed > 0:
                share = min(1.0, (time.thread_time() - cpu) / elapsed)
                self.busy = 0.7 * self.busy + 0.3 * share


class _BatchTraces:
    """The batcher's tracing hook: each sampled request's queue wait, and a batch span linked
    to every request it served (server/observability/tracing.Tracing)."""

    def __init__(self, tracing: Any, model: str, version: str) -> None:
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
        for trace, queued_at in zip(traces, enqueued, strict=True):
            if trace is not None:
                trace.child("queue_wait", to_ns(queued_at), start)  # type: ignore[attr-defined]
        self._tracing.record_batch(self._model, self._version, rows, start, end, ok, traces)


def _scores_and_labels(signature: ModelSignature) -> tuple[int | None, int | None]:
    """Positions of a classifier's scores (first float output) and labels (first integer one)."""
    scores = labels = None
    for i, spec in enumerate(signature.outputs):
        if scores is None and spec.datatype in ("FP32", "FP64", "FP16"):
            scores = i
        elif labels is None and spec.datatype.startswith(("INT", "UINT")):
            labels = i
    return scores, labels


def _configured_route(settings: ModelSettings, primary: str) -> Route:
    try:
        return Route(
            model=settings.name,
            primary=primary,
            canary=settings.canary or None,
            canary_percent=settings.canary_percent,
            shadows=tuple(ShadowSpec(v, settings.shadow_sample_percent) for v in settings.shadows),
        )
    except ValueError as exc:
        raise FailedPrecondition(f"models.{settings.name}: {exc}") from exc


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


def reload_backoff(failures: int, interval_s: float, cap_s: float = 60.0) -> float:
    """Seconds until the next registry check after `failures` failed checks in a row."""
    if failures <= 0:
        return interval_s
    return float(min(cap_s, interval_s * (2 ** min(failures, 16))))


def _compatible(old: ModelSignature, new: ModelSignature) -> str | None:
    """Why `new` cannot replace `old` without breaking callers, or None."""
    for spec in old.inputs:
        other = new.input(spec.name)
        if other is None:
            return f"input {spec.name} is gone"
        if other.datatype != spec.datatype or other.shape != spec.shape:
            return (
                f"input {spec.name} changed from {spec.datatype} {list(spec.shape)} "
                f"to {other.datatype} {list(other.shape)}"
            )
    if len(new.inputs) != len(old.inputs):
        return (
            f"inputs changed from {[s.name for s in old.inputs]} to {[s.name for s in new.inputs]}"
        )
    for spec in old.outputs:
        other = new.output(spec.name)
        if other is None:
            return f"output {spec.name} is gone"
        if other.datatype != spec.datatype:
            return f"output {spec.name} changed from {spec.datatype} to {other.datatype}"
    return None


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
        tracing: Any = None,
    ) -> None:
        self._tracing = tracing
        self.loop_load = LoopLoad()
        self._registry = registry
        self._clock = clock
        self._metrics = metrics
        self._runtime_factory = runtime_factory
        self._versions: dict[str, dict[str, ServedModel]] = {}
        self._default: dict[str, ServedModel] = {}
        self.slots: dict[str, ModelSlot] = {}

    @property
    def registry(self) -> Registry:
        return self._registry

    def versions(self, name: str) -> dict[str, ServedModel]:
        return self._versions.get(name, {})

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
        mv = await loop.run_in_executor(None, self._resolve, settings.ref)
        served = await loop.run_in_executor(None, self._load_sync, settings, mv)
        self._versions[served.key.name] = {served.key.version: served}
        self._default[served.key.name] = served
        now_ms = time.time_ns() // 1_000_000
        slot = ModelSlot(settings, served, loaded_at_ms=now_ms, last_check_ms=now_ms)
        self.slots[served.key.name] = slot
        if settings.fallback == "previous" and settings.fallback_ref:
            fallback_mv = await loop.run_in_executor(None, self._resolve, settings.fallback_ref)
            previous = await loop.run_in_executor(None, self._load_sync, settings, fallback_mv)
            problem = _compatible(served.signature, previous.signature)
            if problem is not None:
                raise FailedPrecondition(
                    f"{settings.fallback_ref} cannot stand in for {settings.ref}: {problem}"
                )
            slot.previous = previous
        if settings.canary or settings.shadows:
            await self.set_route(served.key.name, _configured_route(settings, served.key.version))
        return served

    def route(self, name: str) -> Route | None:
        slot = self.slots.get(name)
        return None if slot is None else slot.route

    async def set_route(self, name: str, route: Route) -> Route:
        """Serve `route` for `name`: every version it needs is loaded, warmed up and checked
        against the primary before the route takes effect, in one synchronous step."""
        slot = self.slots.get(name)
        if slot is None:
            raise ModelNotServed(self._unknown_model(name))
        async with slot.lock:
            primary = slot.current
            if route.primary != primary.key.version:
                raise FailedPrecondition(
                    f"route for {name}: primary {route.primary} is not the served version "
                    f"{primary.key.version} (move the alias to change the primary)"
                )
            loop = asyncio.get_running_loop()
            versions = dict(self._versions[name])
            for version in route.versions:
                if version in versions:
                    continue
                settings = replace(slot.settings, ref=f"{name}@{version}", fallback="unavailable")
                mv = await loop.run_in_executor(None, self._resolve, settings.ref)
                extra = await loop.run_in_executor(None, self._load_sync, settings, mv)
                problem = _compatible(primary.signature, extra.signature)
                if problem is not None:
                    extra.batcher.close()
                    extra.runtime.close()
                    raise FailedPrecondition(
                        f"route for {name}: version {version} is not compatible with {primary.key.version}: {problem}"
                    )
                versions[version] = extra
            if route.shadows and slot.mirror is None:
                slot.mirror = self._mirror(slot)
            # The swap: versions and route together.
            self._versions[name] = versions
            slot.route = route
            unused = [s for v, s in versions.items() if v not in route.versions]
            for version in [s.key.version for s in unused]:
                del versions[version]
            for old in unused:
                task = asyncio.create_task(self._retire(old))
                slot.retiring.add(task)
                task.add_done_callback(slot.retiring.discard)
            log.info("route for %s: %s", name, route.to_dict())
            return route

    def _mirror(self, slot: ModelSlot) -> ShadowMirror[ShadowPair]:
        settings = slot.settings

        def under_pressure() -> bool:
            # No spare CPU: the event loop's thread is busy nearly all the time (a saturated
            # loop rarely fills the queue: batches are cut first), or the queue is filling up.
            if self.loop_load.busy > settings.shadow_max_loop_busy:
                return True
            batcher = slot.current.batcher
            bound = batcher.policy.max_queue_size or 0
            return bool(bound) and batcher.queued_rows > settings.shadow_shed_above * bound

        return ShadowMirror(
            settings.name,
            capacity=settings.shadow_queue_size,
            concurrency=settings.shadow_concurrency,
            load_signal=under_pressure,
            on_result=self.pair_sink,
        )

    def pair_sink(self, pair: ShadowPair) -> None:
        """Where shadow pairs go (the app points this at its PairLog)."""

    async def start_mirrors(self) -> None:
        mirrors = [s.mirror for s in self.slots.values() if s.mirror is not None]
        for mirror in mirrors:
            await mirror.start()
        self.loop_load.start()

    async def stop_mirrors(self) -> None:
        await self.loop_load.stop()
        for slot in self.slots.values():
            if slot.mirror is not None:
                await slot.mirror.stop()

    def previous(self, name: str) -> ServedModel | None:
        slot = self.slots.get(name)
        return None if slot is None else slot.previous

    def _resolve(self, ref: str) -> ModelVersion:
        try:
            return self._registry.resolve(ref)
        except RegistryError as exc:
            raise FailedPrecondition(f"cannot resolve {ref}: {exc}") from exc

    async def reload(self, name: str, ref: str | None = None) -> ReloadOutcome:
        """Swap `name` to the version its ref resolves to now, if that changed.

        The new version is fetched (sha256-checked), loaded, warmed up and checked for a
        compatible signature before it takes traffic. The swap itself is one synchronous step:
        requests resolve their model and join its queue without an await in between, so after
        the swap every request that will ever reach the old version is already queued there;
        the old version retires once its batcher has drained. On any failure the old version
        keeps serving and the error is recorded in the slot (and raised).
        """
        slot = self.slots.get(name)
        if slot is None:
            raise ModelNotServed(self._unknown_model(name))
        if ref is not None:
            _same_model(name, slot.settings.ref, ref)
        async with slot.lock:
            settings = slot.settings if ref is None else replace(slot.settings, ref=ref)
            old = slot.current
            loop = asyncio.get_running_loop()
            slot.last_check_ms = time.time_ns() // 1_000_000
            try:
                mv = await loop.run_in_executor(None, self._resolve, settings.ref)
                if mv.version == old.key.version and mv.sha256 == old.version_info.sha256:
                    slot.settings = settings
                    return ReloadOutcome(name, old.key.version, old.key.version, False, "unchanged")
                slot.state = "LOADING"
                new = await loop.run_in_executor(None, self._load_sync, settings, mv)
                problem = _compatible(old.signature, new.signature)
                if problem is not None:
                    new.batcher.close()
                    new.runtime.close()
                    self._forget_metrics(new)
                    raise FailedPrecondition(
                        f"{name} version {mv.version} is not compatible with version "
                        f"{old.key.version} being served: {problem}"
                    )
            except ServingError as exc:
                slot.state = "READY"
                slot.failed_reloads += 1
                slot.last_error = exc.message
                self._metrics.reload_failures.labels(name).inc()
                log.error(
                    "reload of %s failed; version %s keeps serving: %s",
                    name,
                    old.key.version,
                    exc.message,
                )
                raise
            # The swap: synchronous, so no request sees a half-swapped model.
            self._default[name] = new
            extras = {v: s for v, s in self._versions[name].items() if v != old.key.version}
            self._versions[name] = {**extras, new.key.version: new}
            if slot.route is not None:
                slot.route = slot.route.with_primary(new.key.version)
            slot.current = new
            slot.settings = settings
            slot.state = "READY"
            slot.last_error = ""
            slot.reloads += 1
            slot.loaded_at_ms = time.time_ns() // 1_000_000
            self._metrics.model_info.remove(
                name, old.key.version, old.alias or "", old.version_info.sha256
            )
            self._metrics.reloads.labels(name).inc()
            log.info(
                "swapped %s from version %s to %s (%s)",
                name,
                old.key.version,
                new.key.version,
                settings.ref,
            )
            retired: ServedModel | None = old
            if settings.fallback == "previous":
                # Keep the old version warm as the fallback; retire the one it replaces.
                retired, slot.previous = slot.previous, old
            if retired is not None:
                task = asyncio.create_task(self._retire(retired))
                slot.retiring.add(task)
                task.add_done_callback(slot.retiring.discard)
            return ReloadOutcome(name, new.key.version, old.key.version, True, "swapped")

    async def _retire(self, old: ServedModel) -> None:
        """The one place a version is released: once its queue drains, its batcher, executor
        and metric series (gauge callbacks hold the batcher) go; what is left is garbage."""
        await old.batcher.drain()
        old.batcher.close()
        await asyncio.get_running_loop().run_in_executor(None, old.runtime.close)
        self._forget_metrics(old)
        log.info("retired %s version %s", old.key.name, old.key.version)

    def _forget_metrics(self, old: ServedModel) -> None:
        # The same version may be served again already (reload 1 -> 2 -> 1 before this one
        # drained): its series are the new object's then, and stay.
        if any(s.key == old.key for s in self.all()) or any(
            slot.previous is not None and slot.previous.key == old.key
            for slot in self.slots.values()
        ):
            return
        self._metrics.forget_version(old.key.name, old.key.version)

    async def watch(self, interval_s: float) -> None:
        """Poll every served alias; reload what moved. Registry trouble backs off, never stops."""
        failures: dict[str, int] = {}
        next_check: dict[str, float] = {}
        loop = asyncio.get_running_loop()
        while True:
            now = loop.time()
            due = [n for n in self.slots if next_check.get(n, 0.0) <= now]
            for name in due:
                try:
                    await self.reload(name)
                    failures[name] = 0
                except ServingError:
                    failures[name] = failures.get(name, 0) + 1
                next_check[name] = loop.time() + reload_backoff(failures.get(name, 0), interval_s)
            wake = min(next_check.values(), default=loop.time() + interval_s)
            await asyncio.sleep(max(0.05, wake - loop.time()))

    def _load_sync(self, settings: ModelSettings, mv: ModelVersion) -> ServedModel:
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
            _policy(settings),
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

    async def drain(self) -> None:
        await asyncio.gather(*(m.batcher.drain() for m in self.all()))
        retiring = [t for slot in self.slots.values() for t in slot.retiring]
        if retiring:
            await asyncio.gather(*retiring, return_exceptions=True)

    def close(self) -> None:
        for served in self.all():
            served.batcher.close()
            served.runtime.close()


def _same_model(name: str, served_ref: str, ref: str) -> None:
    """A reload may move a served model to another version or alias of the same registry
    model, never to another model: `churn` reloaded with `churn_mlp@1` would swap what every
    client of `churn` gets behind their back (InvalidArgument naming both)."""
    try:
        wanted = parse_ref(ref).name
    except RegistryError as exc:
        raise InvalidArgument(f"ref: {exc}") from exc
    served = parse_ref(served_ref).name
    if wanted != served:
        raise InvalidArgument(
            f"ref: {ref!r} names registry model {wanted!r}, but {name!r} serves {served!r}; "
            f"a reload may change the version or alias, not the model (e.g. {served}@2)"
        )
