"""The use case: a validated request -> its model version's batcher -> the outputs it asked for.

Later stages (routing, features, breaker, mirroring, drift) plug in here; transport stays in
server/api and knows nothing of them.
"""

from __future__ import annotations

import asyncio
import time
from typing import Protocol

import numpy as np

from server.clock import Clock
from server.errors import FailedPrecondition, ServingError, Unavailable
from server.features.store import FeatureLookup
from server.features.view import FeatureView
from server.models import ModelManager, ServedModel
from server.types import InferRequest, InferResult, ModelKey


class FeatureObserver(Protocol):
    def fetched(self, key: ModelKey, rows: int, seconds: float) -> None: ...

    def defaulted(self, key: ModelKey, rows: int, reason: str) -> None: ...

    def filled(self, key: ModelKey, values: int) -> None: ...


class InferencePipeline:
    """Runs requests against served models; records each request's outcome and latency."""

    def __init__(
        self,
        models: ModelManager,
        clock: Clock,
        *,
        features: FeatureLookup | None = None,
        feature_observer: FeatureObserver | None = None,
    ) -> None:
        self.models = models
        self._clock = clock
        self._features = features
        self._feature_observer = feature_observer
        self._accepting = True
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def accepting(self) -> bool:
        return self._accepting

    def resolve(self, name: str, version: str | None) -> ServedModel:
        if not self._accepting:
            raise Unavailable("server is shutting down")
        return self.models.get(name, version)

    async def infer(self, served: ServedModel, request: InferRequest) -> InferResult:
        if not self._accepting:
            raise Unavailable("server is shutting down")
        start = self._clock.now()
        self._in_flight += 1
        self._idle.clear()
        status = "OK"
        parameters: dict[str, object] = {}
        try:
            view = served.view
            if view is not None and view.entity_key in request.inputs:
                request.inputs, parameters = await self._features_for(served, view, request)
            outputs = await served.batcher.submit(request.inputs, request.rows, request.deadline)
            index = served.output_index
            if request.outputs is None:
                selected = dict(zip(index, outputs, strict=True))
            else:
                selected = {name: outputs[index[name]] for name in request.outputs}
            return InferResult(
                model=served.key.name,
                version=served.key.version,
                id=request.id,
                outputs=selected,
                raw_output=request.raw_output,
                parameters=parameters,
            )
        except ServingError as exc:
            status = exc.kind.name
            raise
        except asyncio.CancelledError:
            status = "CANCELLED"
            raise
        except BaseException:
            status = "INTERNAL"
            raise
        finally:
            served.observer.request_done(self._clock.now() - start, status)
            self._in_flight -= 1
            if self._in_flight == 0:
                self._idle.set()

    async def _features_for(
        self, served: ServedModel, view: FeatureView, request: InferRequest
    ) -> tuple[dict[str, np.ndarray], dict[str, object]]:
        """Entity ids -> the model's feature matrix, through the view (the one definition)."""
        ids = [
            e.decode("utf-8", "replace") if isinstance(e, bytes) else str(e)
            for e in request.inputs[view.entity_key].ravel()
        ]
        if self._features is None:
            raise FailedPrecondition(
                f"model {served.key.name} was sent {view.entity_key} but the server has no "
                "feature store configured (server.feature_store)"
            )
        start = self._clock.now()
        observer = self._feature_observer
        try:
            blobs = await self._features.get([view.key(i) for i in ids])
        except Unavailable:
            if view.on_store_error != "defaults":
                raise
            if observer is not None:
                observer.defaulted(served.key, len(ids), "store_error")
            return {served.feature_input: view.default_matrix(len(ids))}, {
                "features_fallback": "defaults",
                "defaulted_rows": ",".join(map(str, range(len(ids)))),
            }
        finally:
            if observer is not None:
                observer.fetched(served.key, len(ids), self._clock.now() - start)
        matrix, defaulted, filled = view.to_matrix(ids, blobs, time.time_ns() / 1e9)
        parameters: dict[str, object] = {}
        if defaulted:
            parameters["defaulted_rows"] = ",".join(map(str, defaulted))
            if observer is not None:
                observer.defaulted(served.key, len(defaulted), "missing")
        if filled and observer is not None:
            observer.filled(served.key, filled)
        return {served.feature_input: matrix}, parameters

    def stop_accepting(self) -> None:
        self._accepting = False

    async def drain(self) -> None:
        """Wait until every accepted request has its answer."""
        await self._idle.wait()
