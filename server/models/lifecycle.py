"""ModelManager: the served model versions, loaded once from the registry, warmed up, batched;
swapped on reload, extended by routes, retired when drained.

Lookups by (name, version) are dictionary reads on the request path; loading happens at start-up
(and on reload or a new route) away from it, in an executor (server/models/loading.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import replace

from registry_client import Registry
from registry_client.backoff import exponential_backoff
from registry_client.errors import RegistryError
from registry_client.refs import parse_ref
from server.clock import Clock
from server.config import ModelSettings
from server.errors import FailedPrecondition, InvalidArgument, ServingError
from server.models.loading import VersionLoader
from server.models.loop_load import LoopLoad
from server.models.served import (
    ModelNotServed,
    ModelSlot,
    ModelStatus,
    ReloadOutcome,
    ServedModel,
)
from server.observability.metrics import Metrics
from server.routing import Route, ShadowSpec
from server.runtime import OnnxModel, RuntimeOptions
from server.shadow.mirror import ShadowMirror
from server.shadow.pairs import ShadowPair
from server.types import ModelSignature, Tracer

log = logging.getLogger("server.models")


def _drop(pair: ShadowPair) -> None:
    pass


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


def reload_backoff(failures: int, interval_s: float, cap_s: float = 60.0) -> float:
    """Seconds until the next registry check after `failures` failed checks in a row:
    the interval, then 2x, 4x, ... the interval (the first failure already doubles it)."""
    if failures <= 0:
        return interval_s
    return exponential_backoff(failures + 1, interval_s, cap_s)


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
        tracing: Tracer | None = None,
        pair_sink: Callable[[ShadowPair], None] | None = None,
        on_retired: Callable[[], object] | None = None,
    ) -> None:
        self.loop_load = LoopLoad()
        # Called after a version is released (the app settles the heap there: server/heap.py).
        self._on_retired = on_retired
        self._registry = registry
        self._metrics = metrics
        self._loader = VersionLoader(
            registry, clock, metrics, runtime_factory=runtime_factory, tracing=tracing
        )
        # Where shadow pairs go (the app's PairLog); None: mirrored results are dropped.
        self._pair_sink = pair_sink
        self._versions: dict[str, dict[str, ServedModel]] = {}
        self._default: dict[str, ServedModel] = {}
        self._slots: dict[str, ModelSlot] = {}

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
        mv = await loop.run_in_executor(None, self._loader.resolve, settings.ref)
        served = await loop.run_in_executor(None, self._loader.load, settings, mv)
        self._versions[served.key.name] = {served.key.version: served}
        self._default[served.key.name] = served
        now_ms = time.time_ns() // 1_000_000
        slot = ModelSlot(settings, served, loaded_at_ms=now_ms, last_check_ms=now_ms)
        self._slots[served.key.name] = slot
        if settings.fallback == "previous" and settings.fallback_ref:
            fallback_mv = await loop.run_in_executor(
                None, self._loader.resolve, settings.fallback_ref
            )
            previous = await loop.run_in_executor(None, self._loader.load, settings, fallback_mv)
            problem = _compatible(served.signature, previous.signature)
            if problem is not None:
                raise FailedPrecondition(
                    f"{settings.fallback_ref} cannot stand in for {settings.ref}: {problem}"
                )
            slot.previous = previous
        if settings.canary or settings.shadows:
            await self.set_route(served.key.name, _configured_route(settings, served.key.version))
        return served

    def status(self, name: str | None = None) -> list[ModelStatus]:
        """Every served name's status (or `name`'s alone: NotFound if it is not served)."""
        if name is None:
            return [slot.status() for slot in self._slots.values()]
        slot = self._slots.get(name)
        if slot is None:
            raise ModelNotServed(self._unknown_model(name))
        return [slot.status()]

    def mirror(self, name: str) -> ShadowMirror[ShadowPair] | None:
        """The mirror feeding `name`'s shadows, if its route has ever had one."""
        slot = self._slots.get(name)
        return None if slot is None else slot.mirror

    def mirrors(self) -> list[ShadowMirror[ShadowPair]]:
        return [s.mirror for s in self._slots.values() if s.mirror is not None]

    def route(self, name: str) -> Route | None:
        slot = self._slots.get(name)
        return None if slot is None else slot.route

    async def set_route(self, name: str, route: Route) -> Route:
        """Serve `route` for `name`: every version it needs is loaded, warmed up and checked
        against the primary before the route takes effect, in one synchronous step."""
        slot = self._slots.get(name)
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
                mv = await loop.run_in_executor(None, self._loader.resolve, settings.ref)
                extra = await loop.run_in_executor(None, self._loader.load, settings, mv)
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
            on_result=self._pair_sink or _drop,
        )

    async def start_mirrors(self) -> None:
        mirrors = [s.mirror for s in self._slots.values() if s.mirror is not None]
        for mirror in mirrors:
            await mirror.start()
        self.loop_load.start()

    async def stop_mirrors(self) -> None:
        await self.loop_load.stop()
        for slot in self._slots.values():
            if slot.mirror is not None:
                await slot.mirror.stop()

    def previous(self, name: str) -> ServedModel | None:
        slot = self._slots.get(name)
        return None if slot is None else slot.previous

    async def reload(self, name: str, ref: str | None = None) -> ReloadOutcome:
        """Swap `name` to the version its ref resolves to now, if that changed.

        The new version is fetched (sha256-checked), loaded, warmed up and checked for a
        compatible signature before it takes traffic. The swap itself is one synchronous step:
        requests resolve their model and join its queue without an await in between, so after
        the swap every request that will ever reach the old version is already queued there;
        the old version retires once its batcher has drained. On any failure the old version
        keeps serving and the error is recorded in the slot (and raised).
        """
        slot = self._slots.get(name)
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
                mv = await loop.run_in_executor(None, self._loader.resolve, settings.ref)
                if mv.version == old.key.version and mv.sha256 == old.version_info.sha256:
                    slot.settings = settings
                    return ReloadOutcome(name, old.key.version, old.key.version, False, "unchanged")
                slot.state = "LOADING"
                new = await loop.run_in_executor(None, self._loader.load, settings, mv)
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
        if self._on_retired is not None:
            self._on_retired()  # the app settles the heap after this turn, `old` gone by then

    def _forget_metrics(self, old: ServedModel) -> None:
        # The same version may be served again already (reload 1 -> 2 -> 1 before this one
        # drained): its series are the new object's then, and stay.
        if any(s.key == old.key for s in self.all()) or any(
            slot.previous is not None and slot.previous.key == old.key
            for slot in self._slots.values()
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
            due = [n for n in self._slots if next_check.get(n, 0.0) <= now]
            for name in due:
                try:
                    await self.reload(name)
                    failures[name] = 0
                except ServingError:
                    failures[name] = failures.get(name, 0) + 1
                next_check[name] = loop.time() + reload_backoff(failures.get(name, 0), interval_s)
            wake = min(next_check.values(), default=loop.time() + interval_s)
            await asyncio.sleep(max(0.05, wake - loop.time()))

    async def drain(self) -> None:
        await asyncio.gather(*(m.batcher.drain() for m in self.all()))
        retiring = [t for slot in self._slots.values() for t in slot.retiring]
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
