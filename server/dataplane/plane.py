"""The data plane: the one interface every transport calls (MLServer's DataPlane is the model).

The gRPC servicers (V2 inference, admin), Triton's repository calls and the HTTP binding convert
their messages, call a method here and convert the answer back; none of them reaches the models,
the pipeline or the control plane past it. Answers are domain values and plain dicts shaped as
the V2 protocol's JSON (server/api/describe.py builds them); the transports' codecs turn those
into protobuf or JSON. Errors are ServingErrors with a kind; each transport maps kinds to its
status codes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from server.clock import Clock
from server.control import ControlPlane
from server.dataplane import describe
from server.errors import FailedPrecondition, InvalidArgument
from server.models import ModelManager, ModelStatus, ReloadOutcome, ServedModel
from server.pipeline import InferencePipeline
from server.routing import Route, ShadowSpec
from server.types import InferRequest, InferResult


class DataPlane:
    """Inference, health, metadata, statistics and the admin operations of one process.

    Writes (reload, route) go through the control plane when there is one (every worker and
    replica follows them), else to this process's models alone.
    """

    def __init__(
        self,
        pipeline: InferencePipeline,
        models: ModelManager,
        clock: Clock,
        *,
        is_ready: Callable[[], bool],
        control: ControlPlane | None = None,
    ) -> None:
        self._pipeline = pipeline
        self._models = models
        self._clock = clock
        self._is_ready = is_ready
        self._control = control
        # When the last inference request arrived, on any transport (the drain waits for a
        # quiet moment before it stops the listeners).
        self.last_call = clock.now()

    # ---- inference -------------------------------------------------------------------------

    def resolve(self, name: str, version: str | None) -> ServedModel:
        """The served version an inference request names (the step before decoding it, whose
        checks depend on the version's signature); counts as the request's arrival."""
        self.last_call = self._clock.now()
        if not name:
            raise InvalidArgument("model_name is required")
        return self._pipeline.resolve(name, version or None)

    async def infer(self, served: ServedModel, request: InferRequest) -> InferResult:
        return await self._pipeline.infer(served, request)

    @property
    def in_flight(self) -> int:
        return self._pipeline.in_flight

    # ---- health and metadata ---------------------------------------------------------------

    def live(self) -> bool:
        return True

    def ready(self) -> bool:
        return self._is_ready()

    def model(self, name: str, version: str | None = None) -> ServedModel:
        """A served version (NotFound naming what is served); `name` is required."""
        if not name:
            raise InvalidArgument("name is required")
        return self._models.get(name, version or None)

    def model_ready(self, name: str, version: str | None = None) -> bool:
        """Whether `name` (version) can take requests now; NotFound if it is not served."""
        self.model(name, version)
        return self._is_ready()

    def server_metadata(self) -> dict[str, Any]:
        return describe.server_metadata()

    def model_metadata(self, name: str, version: str | None = None) -> dict[str, Any]:
        served = self.model(name, version)
        versions = list(self._models.versions(served.key.name))
        return describe.model_metadata(served, versions)

    def model_config(self, name: str, version: str | None = None) -> dict[str, Any]:
        return describe.model_config(self.model(name, version))

    def model_statistics(self, name: str = "", version: str | None = None) -> dict[str, Any]:
        """Triton's statistics for `name` (version), or for every served version."""
        chosen = [self.model(name, version)] if name else self._models.all()
        return describe.model_statistics(chosen)

    def repository_index(self) -> list[dict[str, Any]]:
        return describe.repository_index(self._models.all())

    # ---- admin -----------------------------------------------------------------------------

    async def reload(self, name: str, ref: str | None = None) -> ReloadOutcome:
        """Re-resolve `name`'s ref (or move it to `ref`) and swap if the version moved."""
        if self._control is not None:
            return await self._control.reload(name, ref or None)
        return await self._models.reload(name, ref or None)

    def unload(self, name: str) -> None:
        """Refused: a served model is unloaded by removing it from the config."""
        raise FailedPrecondition(describe.unload_refused(name))

    def route(self, name: str) -> Route:
        """`name`'s traffic split (its primary alone when no route was set)."""
        served = self._models.get(name)
        return self._models.route(name) or Route(name, served.key.version)

    async def set_route(
        self,
        name: str,
        *,
        primary: str = "",
        canary: str = "",
        canary_percent: float = 0.0,
        shadows: Sequence[tuple[str, float]] = (),
    ) -> Route:
        """Serve a new split: `primary` (default: the served version), a canary answering
        `canary_percent` of unpinned requests, shadows (version, sample percent; 0 means 100)."""
        served = self._models.get(name)
        try:
            route = Route(
                model=name,
                primary=primary or served.key.version,
                canary=canary or None,
                canary_percent=canary_percent,
                shadows=tuple(ShadowSpec(v, p or 100.0) for v, p in shadows),
            )
        except ValueError as exc:
            raise InvalidArgument(f"route for {name}: {exc}") from exc
        if self._control is not None:
            return await self._control.set_route(name, route)
        return await self._models.set_route(name, route)

    def status(self, name: str = "") -> list[ModelStatus]:
        """Every served model's status, or `name`'s (NotFound when it is not served)."""
        return self._models.status(name or None)
