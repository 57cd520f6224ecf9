"""Domain values shared across the serving path (no transport, no runtime types)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

# V2 datatype name <-> numpy dtype (BYTES is an object array of bytes): the one table.
from registry_client.datatypes import NUMPY_TO_V2 as NUMPY_TO_V2
from registry_client.datatypes import V2_TO_NUMPY as V2_TO_NUMPY


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """A model input or output: V2 datatype and shape, -1 for a variable dimension.

    For batchable models the first dimension is the batch dimension and is always -1.
    """

    name: str
    datatype: str
    shape: tuple[int, ...]

    @property
    def dtype(self) -> np.dtype[np.generic]:
        return V2_TO_NUMPY[self.datatype]


@dataclass(frozen=True, slots=True)
class ModelSignature:
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    def input(self, name: str) -> TensorSpec | None:
        for spec in self.inputs:
            if spec.name == name:
                return spec
        return None

    def output(self, name: str) -> TensorSpec | None:
        for spec in self.outputs:
            if spec.name == name:
                return spec
        return None


@dataclass(frozen=True, slots=True)
class ModelKey:
    """One served model version."""

    name: str
    version: str

    def __str__(self) -> str:
        return f"{self.name}:{self.version}"


class Trace(Protocol):
    """A sampled request's span while it is served (server/observability/tracing.RequestTrace):
    what the transports, the pipeline and the batcher may do with it."""

    trace_id: int

    def child(self, name: str, start_ns: int, end_ns: int, /) -> None: ...

    def end(self, status_code: str = "OK", message: str = "", /) -> None: ...


class Tracer(Protocol):
    """Request tracing as the serving path sees it (server/observability/tracing.Tracing, when
    it is enabled; None everywhere when it is off, which costs one check per request)."""

    def start_request(
        self,
        name: str,
        metadata: Iterable[tuple[str, str | bytes]] | None,
        attributes: Mapping[str, str] | None = None,
        /,
    ) -> Trace | None: ...

    def epoch_ns(self, clock_seconds: float, /) -> int: ...

    def record_batch(
        self,
        model: str,
        version: str,
        rows: int,
        start_ns: int,
        end_ns: int,
        ok: bool,
        requests: Sequence[Trace | None],
        /,
    ) -> None: ...


@dataclass(slots=True)
class InferRequest:
    """A validated request: every input present, typed and shaped per the signature.

    `inputs` are numpy arrays whose first dimension is `rows`. `outputs` names the outputs the
    caller asked for, in the order it asked (None: all of the model's outputs).
    """

    model: str
    version: str | None
    id: str
    inputs: dict[str, np.ndarray]
    rows: int
    outputs: tuple[str, ...] | None = None
    raw_output: bool = True
    deadline: float | None = None
    parameters: dict[str, object] = field(default_factory=dict)
    # The request's trace when it is sampled (server/observability/tracing.RequestTrace).
    trace: Trace | None = None
    # The binding it came in on ("grpc" or "http"), a label of the request metrics.
    protocol: str = "grpc"
    # False for traffic that must stay out of drift and shadow statistics (the request said
    # `drift: false`, or tagged itself `traffic: <not live>`, as load tests do).
    observed: bool = True


@dataclass(slots=True)
class InferResult:
    """The answer to one InferRequest: the outputs it asked for, in order."""

    model: str
    version: str
    id: str
    outputs: dict[str, np.ndarray]
    raw_output: bool = True
    parameters: dict[str, object] = field(default_factory=dict)
