"""What a served model is: one loaded version (ServedModel), one served name (ModelSlot, private
to the manager), and the snapshots and outcomes the manager hands out."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from registry_client import ModelVersion
from server.batching import DynamicBatcher
from server.breaker import CircuitBreaker
from server.config import ModelSettings
from server.errors import NotFound
from server.features.view import FeatureView
from server.observability.metrics import ModelObserver
from server.observability.stats import ModelStats
from server.routing import Route
from server.runtime import OnnxModel
from server.shadow.mirror import ShadowMirror
from server.shadow.pairs import ShadowPair
from server.types import ModelKey, ModelSignature


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
    # Requests accepted for this version and not yet answered (`admit` / `release`).
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

    def request_signature(self, tensors: Sequence[Any]) -> ModelSignature:
        """The signature a request sending `tensors` (anything with a `.name`: the request's
        input headers) is checked against: the model's, or for an entity-keyed version, ids
        alone (the server reads the features) or features and ids together (the features win;
        the ids route and label the request)."""
        entity = self.entity_signature
        if entity is not None:
            key = entity.inputs[0].name
            n = len(tensors)
            if n == 1 and tensors[0].name == key:
                return entity
            if n == 2 and key in (tensors[0].name, tensors[1].name):
                return self.combined_signature or self.runtime.signature
        return self.runtime.signature

    def admit(self) -> bool:
        """Take one in-flight place; False when `max_in_flight` are taken already."""
        cap = self.settings.max_in_flight
        if cap and self.in_flight >= cap:
            return False
        self.in_flight += 1
        return True

    def release(self) -> None:
        self.in_flight -= 1


class ModelNotServed(NotFound):
    pass


@dataclass(frozen=True)
class ReloadOutcome:
    model: str
    version: str
    previous_version: str
    changed: bool
    message: str


@dataclass(frozen=True)
class ModelStatus:
    """A served model name as it is now: its configured ref and settings, the live version,
    the route and the reload history (a copy; changing it changes nothing)."""

    name: str
    version: str
    ref: str
    alias: str
    state: str
    last_error: str
    loaded_at_ms: int
    last_check_ms: int
    reloads: int
    failed_reloads: int
    execution: str
    version_info: ModelVersion
    settings: ModelSettings
    route: Route | None


@dataclass(eq=False)
class ModelSlot:
    """One served model name: its configured ref, the live version and its reload history.
    The manager's own record: everyone else reads a ModelStatus."""

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

    def status(self) -> ModelStatus:
        served = self.current
        return ModelStatus(
            name=served.key.name,
            version=served.key.version,
            ref=self.settings.ref,
            alias=served.alias or "",
            state=self.state,
            last_error=self.last_error,
            loaded_at_ms=self.loaded_at_ms,
            last_check_ms=self.last_check_ms,
            reloads=self.reloads,
            failed_reloads=self.failed_reloads,
            execution="inline" if served.inline else "executor",
            version_info=served.version_info,
            settings=self.settings,
            route=self.route,
        )
