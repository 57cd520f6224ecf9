"""One control plane for every worker and replica: routes and pinned refs live in the registry.

An admin call (SetRoute, ReloadModel, Triton's RepositoryModelLoad, the promotion gate) is
applied here first (so a version that cannot load or does not fit is refused before anything is
written), then written to the registry's control record for this deployment (generation G), then
announced to the other worker processes of this server, and answered once every local worker has
applied generation G. Replicas elsewhere (other pods of the Deployment) notice the new record on
their next poll (`server.poll_interval_s`, 2 s by default) and apply it the same way.

At start-up a worker reads the record before loading anything, so a replica started after a
SetRoute serves the route, not the configuration's stale one.

Local workers (`--workers N`) share a folder the parent creates (LocalBus): a `bump` file whose
change makes siblings re-read the record within ~50 ms, and one `applied.<i>.json` per worker
saying which generation each model is at (and the error, if applying failed there).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from registry_client.control import ControlState, ControlStore
from registry_client.errors import RegistryError
from server.config import ModelSettings
from server.errors import FailedPrecondition, ServingError, Unavailable
from server.models import ModelManager, ReloadOutcome
from server.routing import Route, ShadowSpec

log = logging.getLogger(__name__)

BUS_POLL_S = 0.05


def route_record(route: Route | None) -> dict[str, Any] | None:
    """What the control record stores of a route (never the primary)."""
    if route is None:
        return None
    return {
        "canary": route.canary or "",
        "canary_percent": route.canary_percent,
        "shadows": [s.to_dict() for s in route.shadows],
    }


def route_from_record(name: str, primary: str, record: dict[str, Any]) -> Route:
    """The route a record asks for with `primary` served; a canary or shadow that has become
    the primary is dropped (the alias moved onto it)."""
    canary = str(record.get("canary") or "") or None
    percent = float(record.get("canary_percent", 0.0) or 0.0)
    shadows = tuple(ShadowSpec.from_dict(s) for s in record.get("shadows", ()))
    if canary == primary:
        canary, percent = None, 0.0
    return Route(name, primary, canary, percent, tuple(s for s in shadows if s.version != primary))


def _same_route(a: Route | None, b: Route) -> bool:
    if a is None:
        return b.canary is None and not b.shadows
    return (a.canary, a.canary_percent, a.shadows) == (b.canary, b.canary_percent, b.shadows)


class LocalBus:
    """How the worker processes of one server tell each other "the control record moved" and
    say which generation they have applied. A folder the parent owns; files written whole."""

    def __init__(self, folder: str | Path, index: int, count: int) -> None:
        self.folder = Path(folder)
        self.index = index
        self.count = count
        self._bump = self.folder / "bump"
        self._seen: object = self._bump_token()
        self._applied: dict[str, dict[str, Any]] = {}

    def _bump_token(self) -> object:
        try:
            st = os.stat(self._bump)
        except FileNotFoundError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def bump(self) -> None:
        tmp = self.folder / f".bump.{self.index}"
        tmp.write_text(f"{self.index} {os.getpid()} {os.urandom(4).hex()}\n")
        os.replace(tmp, self._bump)
        self._seen = self._bump_token()

    def bumped(self) -> bool:
        token = self._bump_token()
        if token != self._seen:
            self._seen = token
            return True
        return False

    def ack(self, name: str, generation: int, error: str = "") -> None:
        self._applied[name] = {"generation": generation, "error": error}
        path = self.folder / f"applied.{self.index}.json"
        tmp = self.folder / f".applied.{self.index}.tmp"
        tmp.write_text(json.dumps(self._applied))
        os.replace(tmp, path)

    def applied(self, name: str) -> dict[int, tuple[int, str]]:
        """Worker index -> (generation applied, error) for `name`, as far as each has said."""
        out: dict[int, tuple[int, str]] = {}
        for i in range(self.count):
            try:
                doc = json.loads((self.folder / f"applied.{i}.json").read_text())
            except (FileNotFoundError, ValueError):
                continue
            entry = doc.get(name)
            if isinstance(entry, dict):
                out[i] = (int(entry.get("generation", 0)), str(entry.get("error", "")))
        return out


@dataclass
class _Applied:
    generation: int = 0
    error: str = ""


class ControlPlane:
    def __init__(
        self,
        models: ModelManager,
        store: ControlStore | None,
        *,
        bus: LocalBus | None = None,
        poll_interval_s: float = 2.0,
        apply_timeout_s: float = 120.0,
    ) -> None:
        self._models = models
        self._store = store
        self._bus = bus
        self._poll_s = poll_interval_s
        self._timeout_s = apply_timeout_s
        self._configured: dict[str, ModelSettings] = {}
        self._applied: dict[str, _Applied] = {}
        self._tokens: dict[str, object] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    @property
    def shared(self) -> bool:
        """Whether control state outlives this process and reaches other workers/replicas."""
        return self._store is not None

    def _lock(self, name: str) -> asyncio.Lock:
        return self._locks.setdefault(name, asyncio.Lock())

    async def _call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(None, lambda: fn(*args, **kwargs))
        except (RegistryError, OSError) as exc:
            raise Unavailable(f"control state in the registry: {exc}") from exc

    # -- start-up ------------------------------------------------------------------------------

    async def configure(self, settings: ModelSettings) -> ModelSettings:
        """The settings to load `settings.name` with: the stored ref and route win over the
        configuration (they were set at run time, after the configuration was written)."""
        name = settings.name
        self._configured[name] = settings
        if self._store is None:
            return settings
        state: ControlState = await self._call(self._store.read, name)
        self._applied[name] = _Applied(state.generation)
        if state.generation == 0:
            return settings
        out = settings
        if state.ref:
            out = replace(out, ref=state.ref)
        if state.route is not None:
            record = state.route
            shadows = [ShadowSpec.from_dict(s) for s in record.get("shadows", ())]
            # Loaded with one sample rate; started() then applies each shadow's own.
            out = replace(
                out,
                canary=str(record.get("canary") or ""),
                canary_percent=float(record.get("canary_percent", 0.0) or 0.0),
                shadows=tuple(s.version for s in shadows),
                shadow_sample_percent=max(
                    (s.sample_percent for s in shadows), default=settings.shadow_sample_percent
                ),
            )
        log.info(
            "%s: control state generation %d from the registry (ref %s, route %s) "
            "overrides the configuration",
            name,
            state.generation,
            out.ref,
            state.route,
        )
        return out

    async def started(self) -> None:
        """After every model loaded: apply stored routes exactly (per-shadow sample rates) and
        tell the other workers where this one is."""
        for name in self._models.names():
            applied = self._applied.setdefault(name, _Applied())
            if self._store is not None and applied.generation:
                state = await self._call(self._store.read, name)
                await self._apply(name, state)
            elif self._bus is not None:
                self._bus.ack(name, applied.generation)

    # -- admin calls -----------------------------------------------------------------------------

    async def set_route(self, name: str, route: Route) -> Route:
        async with self._lock(name):
            route = await self._models.set_route(name, route)
            await self._publish(name, route=route_record(route))
        return route

    async def reload(self, name: str, ref: str | None = None) -> ReloadOutcome:
        async with self._lock(name):
            outcome = await self._models.reload(name, ref)
            await self._publish(name, **({} if ref is None else {"ref": ref}))
        return outcome

    async def _publish(self, name: str, **fields: Any) -> None:
        """Write the new record (generation + 1), announce it and wait for the local workers."""
        if self._store is None:
            return
        try:
            state: ControlState = await self._call(self._store.update, name, **fields)
        except Unavailable as exc:
            raise Unavailable(
                f"{name}: applied on this worker only; {exc.message} (other workers and "
                "replicas keep what they serve)"
            ) from exc
        self._applied[name] = _Applied(state.generation)
        self._tokens[name] = await self._call(self._store.change_token, name)
        if self._bus is None:
            return
        self._bus.ack(name, state.generation)
        self._bus.bump()
        await self._wait_local(name, state.generation)

    async def _wait_local(self, name: str, generation: int) -> None:
        assert self._bus is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._timeout_s
        while True:
            applied = self._bus.applied(name)
            done = {i: e for i, (g, e) in applied.items() if g >= generation}
            if len(done) >= self._bus.count:
                failed = {i: e for i, e in done.items() if e}
                if failed:
                    i, error = next(iter(failed.items()))
                    raise FailedPrecondition(
                        f"{name}: control state generation {generation} was written, but "
                        f"{len(failed)} of {self._bus.count} workers could not apply it "
                        f"(worker {i}: {error})"
                    )
                return
            if loop.time() > deadline:
                raise Unavailable(
                    f"{name}: control state generation {generation} applied by {len(done)} of "
                    f"{self._bus.count} workers after {self._timeout_s:.0f} s; the rest apply it "
                    "when they can"
                )
            await asyncio.sleep(BUS_POLL_S / 2)

    # -- following the record ------------------------------------------------------------------

    async def _apply(self, name: str, state: ControlState) -> None:
        """Make `name` serve what `state` says (ref, then route); record the generation."""
        error = ""
        async with self._lock(name):
            try:
                (before,) = self._models.status(name)
                configured = self._configured.get(name, before.settings)
                # Always a reload: a new generation with the same ref is a re-resolve of its
                # alias asked for on another worker (cheap when nothing moved).
                await self._models.reload(name, state.ref or configured.ref)
                primary = self._models.get(name).key.version
                if state.route is not None:
                    wanted = route_from_record(name, primary, state.route)
                    if not _same_route(self._models.route(name), wanted):
                        await self._models.set_route(name, wanted)
            except (ServingError, ValueError) as exc:
                error = exc.message if isinstance(exc, ServingError) else str(exc)
                log.error(
                    "%s: cannot apply control state generation %d: %s",
                    name,
                    state.generation,
                    error,
                )
            self._applied[name] = _Applied(state.generation, error)
            if self._bus is not None:
                self._bus.ack(name, state.generation, error)

    def _applied_gen(self, name: str) -> int:
        return self._applied.get(name, _Applied()).generation

    async def _check(self, name: str, *, force: bool) -> None:
        assert self._store is not None
        token = await self._call(self._store.change_token, name)
        if not force and token is not None and token == self._tokens.get(name):
            return
        state: ControlState = await self._call(self._store.read, name)
        self._tokens[name] = token
        if state.generation > self._applied_gen(name):
            await self._apply(name, state)

    async def run(self) -> None:
        """Follow the record: on a local bump at once, otherwise every poll interval."""
        if self._store is None:
            return
        loop = asyncio.get_running_loop()
        # poll_interval_s = 0 (watching off): only the local workers' bumps are followed.
        forever = float("inf")
        next_poll = loop.time() + self._poll_s if self._poll_s > 0 else forever
        while True:
            bumped = self._bus is not None and self._bus.bumped()
            due = loop.time() >= next_poll
            if bumped or due:
                if due:
                    next_poll = loop.time() + self._poll_s if self._poll_s > 0 else forever
                for name in self._models.names():
                    try:
                        # A bump or a poll of a backend without a cheap change token reads the
                        # record; otherwise only a changed token does.
                        await self._check(name, force=bumped)
                    except ServingError as exc:
                        log.warning("%s: control state not readable: %s", name, exc.message)
            if self._bus is None and next_poll == forever:
                return
            await asyncio.sleep(BUS_POLL_S if self._bus is not None else min(self._poll_s, 0.5))
