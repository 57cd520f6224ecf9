"""The use case: a validated request -> its model version's batcher -> the outputs it asked for.

Later stages (routing, features, breaker, mirroring, drift) plug in here; transport stays in
server/api and knows nothing of them.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from typing import Protocol

import numpy as np

from server.clock import Clock
from server.drift import PredictionSink
from server.errors import (
    DeadlineExceeded,
    ErrorKind,
    FailedPrecondition,
    ModelError,
    ResourceExhausted,
    ServingError,
    Unavailable,
)
from server.features.store import FeatureLookup
from server.features.view import FeatureView
from server.models import ModelManager, ServedModel
from server.routing import Route, choose_version, mirror_targets
from server.shadow.log import PairLog
from server.shadow.pairs import ShadowPair
from server.types import InferRequest, InferResult, ModelKey, Tracer


def _sticky_key(served: ServedModel, request: InferRequest) -> str:
    """The canary split is sticky by entity id when the request has one, else by request id."""
    view = served.view
    if view is not None and view.entity_key in request.inputs:
        ids = request.inputs[view.entity_key]
        if ids.size:
            first = ids.ravel()[0]
            return first.decode("utf-8", "replace") if isinstance(first, bytes) else str(first)
    return request.id


log = logging.getLogger(__name__)


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
        drift: PredictionSink | None = None,
        tracing: Tracer | None = None,
        pair_log: PairLog | None = None,
    ) -> None:
        self._drift = drift
        self._tracing = tracing
        self._models = models
        self._clock = clock
        self._features = features
        self._feature_observer = feature_observer
        # Where mirrored requests that were shed or failed are counted (the shadow pairs
        # themselves reach the log through the models' mirrors).
        self._pair_log = pair_log
        self._accepting = True
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def resolve(self, name: str, version: str | None) -> ServedModel:
        if not self._accepting:
            raise Unavailable("server is shutting down")
        return self._models.get(name, version)

    async def infer(self, served: ServedModel, request: InferRequest) -> InferResult:
        if not self._accepting:
            raise Unavailable("server is shutting down")
        route = self._models.route(served.key.name)
        role = "primary"
        sticky = ""
        if route is not None and request.version is None:
            sticky = _sticky_key(served, request)
            if route.canary is not None:
                version, role = choose_version(route, sticky)
                if version != served.key.version:
                    served = self._models.get(served.key.name, version)
        if not served.admit():
            served.observer.request_done(0.0, "RESOURCE_EXHAUSTED", request.protocol)
            served.observer.dropped("in_flight_cap", 1)
            raise ResourceExhausted(
                f"model {served.key.name} has {served.in_flight} requests in flight "
                f"(max_in_flight {served.settings.max_in_flight})"
            )
        start = self._clock.now()
        self._in_flight += 1
        self._idle.clear()
        status = "OK"
        parameters: dict[str, object] = {}
        try:
            view = served.view
            if view is not None and view.entity_key in request.inputs:
                if served.feature_input in request.inputs:
                    # Features sent with the ids: they are what the model gets (the ids have
                    # routed the request already: the canary split, the drift entity id).
                    del request.inputs[view.entity_key]
                else:
                    request.inputs, parameters = await self._features_for(served, view, request)
            outputs, answered = await self._run(served, request, parameters)
            if role == "canary":
                parameters["route"] = "canary"
            index = answered.output_index
            if request.outputs is None:
                selected = dict(zip(index, outputs, strict=True))
            else:
                selected = {name: outputs[index[name]] for name in request.outputs}
            if self._drift is not None and request.observed:
                self._record_drift(
                    answered, role, request, sticky, outputs, self._clock.now() - start
                )
            if route is not None and route.shadows and request.version is None and request.observed:
                self._mirror(served, route, request, sticky, outputs, self._clock.now() - start)
            return InferResult(
                model=answered.key.name,
                version=answered.key.version,
                id=request.id,
                outputs=selected,
                raw_output=request.raw_output,
                parameters=parameters,
            )
        except ServingError as exc:
            status = exc.kind.name
            if exc.kind is ErrorKind.INTERNAL:
                # One JSON line per failed request, with its ids (client mistakes are not logged:
                # they are counted in batchline_requests_total by status).
                trace = request.trace
                log.error(
                    "request failed: %s",
                    exc.message,
                    extra={
                        "model": served.key.name,
                        "version": served.key.version,
                        "request_id": request.id,
                        "trace_id": f"{trace.trace_id:032x}" if trace is not None else None,
                    },
                )
            raise
        except asyncio.CancelledError:
            status = "CANCELLED"
            raise
        except BaseException:
            status = "INTERNAL"
            raise
        finally:
            served.observer.request_done(self._clock.now() - start, status, request.protocol)
            served.release()
            self._in_flight -= 1
            if self._in_flight == 0:
                self._idle.set()

    async def _run(
        self, served: ServedModel, request: InferRequest, parameters: dict[str, object]
    ) -> tuple[list[np.ndarray], ServedModel]:
        """The model call inside its circuit breaker; the fallback while the breaker is open."""
        breaker = served.breaker
        began = self._clock.now()
        permit = breaker.allow(began)
        if permit is None:
            return await self._fallback(served, request, parameters)
        try:
            submitted = served.batcher.submit(
                request.inputs, request.rows, request.deadline, request.trace
            )
            timeout = served.settings.timeout_ms
            if timeout:
                # asyncio.timeout, not wait_for: no task of its own (3.11's wait_for makes one),
                # so the submit happens in this step, where the batcher's quiet watch expects it.
                async with asyncio.timeout(timeout / 1000):
                    outputs = await submitted
            else:
                outputs = await submitted
        except (ModelError, TimeoutError) as exc:
            ended = self._clock.now()
            breaker.record(permit, False, ended - began, ended)
            if isinstance(exc, TimeoutError):
                raise DeadlineExceeded(
                    f"model {served.key.name} version {served.key.version} took longer than "
                    f"timeout_ms ({served.settings.timeout_ms:g} ms)"
                ) from None
            raise
        except BaseException:
            # Not the model's fault (cancelled, expired, rejected): the call does not count.
            breaker.release(permit, self._clock.now())
            raise
        ended = self._clock.now()
        breaker.record(permit, True, ended - began, ended)
        return outputs, served

    def _record_drift(
        self,
        served: ServedModel,
        role: str,
        request: InferRequest,
        sticky: str,
        outputs: list[np.ndarray],
        latency_s: float,
        features: np.ndarray | None = None,
    ) -> None:
        """One prediction record for the drift sidecar: O(1), never blocks, never raises."""
        assert self._drift is not None
        scores, labels = served.score_output, served.label_output
        if features is None:
            features = request.inputs.get(served.feature_input) if served.feature_input else None
            if features is None:
                features = next(iter(request.inputs.values()))
        self._drift.record(
            served.key.name,
            served.key.version,
            role,
            request.id,
            sticky if served.view is not None else "",
            features,
            outputs[scores] if scores is not None else outputs[0],
            outputs[labels] if labels is not None else None,
            latency_s,
        )

    def _mirror(
        self,
        served: ServedModel,
        route: Route,
        request: InferRequest,
        sticky: str,
        outputs: list[np.ndarray],
        latency_s: float,
    ) -> None:
        """Offer mirrored copies to the shadows; never waits, never raises (shed when full)."""
        name = served.key.name
        mirror = self._models.mirror(name)
        if mirror is None:
            return
        for spec in mirror_targets(route, sticky):
            shadow = self._models.versions(name).get(spec.version)
            if shadow is None:
                continue
            job = functools.partial(
                self._shadow_job, served, shadow, request, sticky, outputs, latency_s
            )
            if not mirror.offer(job) and self._pair_log is not None:
                self._pair_log.note_shed(name)

    async def _shadow_job(
        self,
        primary: ServedModel,
        shadow: ServedModel,
        request: InferRequest,
        sticky: str,
        primary_outputs: list[np.ndarray],
        primary_latency_s: float,
    ) -> ShadowPair:
        copy = InferRequest(
            model=request.model, version=shadow.key.version, id=request.id,
            inputs=request.inputs, rows=request.rows,
        )  # fmt: skip
        start = self._clock.now()
        try:
            outputs, _ = await self._run(shadow, copy, {})
        except ServingError:
            if self._pair_log is not None:
                self._pair_log.note_failure(primary.key.name, shadow.key.version)
            raise
        if self._drift is not None:
            self._record_drift(shadow, "shadow", copy, sticky, outputs, self._clock.now() - start)
        scores, labels = primary.score_output, primary.label_output
        return ShadowPair.from_outputs(
            model=primary.key.name,
            primary_version=primary.key.version,
            shadow_version=shadow.key.version,
            request_id=request.id,
            entity_id=sticky if primary.view is not None else "",
            time_unix_ns=time.time_ns(),
            primary_scores=primary_outputs[scores] if scores is not None else None,
            shadow_scores=outputs[scores] if scores is not None else None,
            primary_labels=primary_outputs[labels] if labels is not None else None,
            shadow_labels=outputs[labels] if labels is not None else None,
            primary_latency_s=primary_latency_s,
            shadow_latency_s=self._clock.now() - start,
        )

    async def _fallback(
        self, served: ServedModel, request: InferRequest, parameters: dict[str, object]
    ) -> tuple[list[np.ndarray], ServedModel]:
        kind = served.settings.fallback
        if kind == "static" and served.static_fallback is not None:
            served.observer.fallback("static")
            parameters["fallback"] = "static"
            rows = request.rows
            return [np.repeat(v[None, ...], rows, axis=0) for v in served.static_fallback], served
        if kind == "previous":
            previous = self._models.previous(served.key.name)
            if previous is not None and previous is not served:
                served.observer.fallback("previous")
                parameters["fallback"] = f"previous:{previous.key.version}"
                return await self._run(previous, request, parameters)
        raise Unavailable(
            f"circuit breaker {served.breaker.name} is open; model {served.key.name} version "
            f"{served.key.version} is failing (retry after "
            f"{served.breaker.config.wait_duration_in_open_s:g}s)"
        )

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
            # Coalesced with other requests' lookups; the store's breaker guards round trips.
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
        if request.trace is not None and self._tracing is not None:
            to_ns = self._tracing.epoch_ns
            request.trace.child("feature_fetch", to_ns(start), to_ns(self._clock.now()))
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
