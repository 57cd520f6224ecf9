"""`[model_defaults]` and `[models.NAME]`: how each served model is loaded, batched and run."""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal, Self

from pydantic import Field, model_validator
from pydantic.dataclasses import dataclass

from server.config.batching import BatchPolicy
from server.config.breaker import BreakerConfig
from server.config.gate import GateConfig
from server.config.validation import SECTION, Bool, Float, Int, Problems, Str, between, section

_AtLeast0 = Annotated[Int, Field(ge=0)]
_AtLeast1 = Annotated[Int, Field(ge=1)]


def _is_ref(text: str) -> bool:
    return "@" in text and bool(text.split("@", 1)[0])


@section("model_defaults")
@dataclass(frozen=True, config=SECTION)
class ModelDefaults:
    """Every key of a [models.NAME] table, defaulted: `[model_defaults]` fills what a model's
    own table leaves out."""

    # NAME@ALIAS or NAME@VERSION; empty: NAME@production.
    ref: Str = ""
    # Dynamic batching (Triton's names where they exist).
    dynamic_batching: Bool = True
    max_batch_size: _AtLeast1 = 64
    max_queue_delay_us: _AtLeast0 = 2000
    preferred_batch_sizes: tuple[Int, ...] = ()
    # Rows allowed to wait; 0 means unbounded (only when asked for).
    max_queue_size: _AtLeast0 = 2048
    # Batches that may run at once in the executor (ONNX Runtime releases the GIL).
    instances: _AtLeast1 = 1
    # "auto" (inline when a batch-1 run is cheaper than a thread hop), "inline" or "executor".
    execution: Literal["auto", "inline", "executor"] = "auto"
    intra_op_threads: _AtLeast0 = 1
    inter_op_threads: _AtLeast0 = 1
    providers: tuple[Str, ...] = ("CPUExecutionProvider",)
    # Requests accepted and not yet answered, per model (Envoy's max_requests); 0: no cap.
    max_in_flight: _AtLeast0 = 4096
    # An inference taking longer than this counts as a failure for the breaker; 0: none.
    timeout_ms: Annotated[Float, Field(ge=0)] = 0.0
    # The circuit breaker around this model's inference ([models.NAME.breaker], resilience4j
    # names: failure_rate_threshold, slow_call_rate_threshold, slow_call_duration_s,
    # sliding_window_type, sliding_window_size, minimum_number_of_calls,
    # wait_duration_in_open_s, permitted_calls_in_half_open, max_wait_in_half_open_s).
    breaker: BreakerConfig = Field(default_factory=BreakerConfig)
    # What answers while the breaker is open: "unavailable", "static" (fallback_outputs, per
    # row) or "previous" (the version served before the last swap, or fallback_ref at start).
    fallback: Literal["unavailable", "static", "previous"] = "unavailable"
    fallback_outputs: dict[str, Any] = Field(default_factory=dict)
    fallback_ref: Str = ""
    # Traffic split: `canary` (a version) answers `canary_percent` of the requests that name no
    # version, sticky by entity id (else request id); `shadows` (versions) get mirrored copies
    # of `shadow_sample_percent` of requests, after the caller has its answer.
    canary: Str = ""
    canary_percent: Annotated[Float, between(0, 100)] = 0.0
    shadows: tuple[Str, ...] = ()
    shadow_sample_percent: Annotated[Float, between(0, 100, open_low=True)] = 100.0
    shadow_queue_size: _AtLeast1 = 256
    shadow_concurrency: _AtLeast1 = 1
    # Mirrored work is shed while the primary's queue holds more than this share of its bound.
    shadow_shed_above: Annotated[Float, between(0, 1, open_low=True)] = 0.5
    # ... or while the event loop's thread is busier than this share of the time (no spare
    # CPU for mirrored work).
    shadow_max_loop_busy: Annotated[Float, between(0, 1.5, open_low=True)] = 0.8
    # The automatic promotion gate over shadow pairs: "off", "log" (decide and log) or "apply"
    # (move the alias to a passing shadow, drop a failing one). [models.NAME.gate] holds
    # min_requests, min_agreement, max_mean_abs_diff, max_error_rate.
    gate_action: Literal["off", "log", "apply"] = "off"
    gate: GateConfig = Field(default_factory=GateConfig)


@section()
@dataclass(frozen=True, kw_only=True, config=SECTION)
class ModelSettings(ModelDefaults):
    """How one served model is loaded, batched and run: its [models.NAME] table over
    [model_defaults]. Construction checks every value and their combinations."""

    name: Str
    # Set from the table's name, never written in it.
    NOT_KEYS: ClassVar[frozenset[str]] = frozenset({"name"})

    @model_validator(mode="after")
    def _check(self) -> Self:
        problems = Problems()
        if self.fallback == "static" and not self.fallback_outputs:
            problems.add("fallback_outputs", "fallback = static needs the outputs to answer")
        if self.fallback_ref and not _is_ref(self.fallback_ref):
            problems.add(
                "fallback_ref", f"expected NAME@ALIAS or NAME@VERSION, got {self.fallback_ref!r}"
            )
        if self.canary_percent and not self.canary:
            problems.add("canary_percent", "set {at}canary (a version) too")
        for size in self.preferred_batch_sizes:
            if not 1 <= size <= self.max_batch_size:
                problems.add(
                    "preferred_batch_sizes",
                    f"{size} is outside 1..max_batch_size ({self.max_batch_size})",
                )
                break
        if not _is_ref(self.ref):
            problems.add("ref", f"expected NAME@ALIAS or NAME@VERSION, got {self.ref!r}")
        problems.check()
        return self

    @property
    def batching(self) -> BatchPolicy:
        """The batcher's section: sizes in rows, the delay in seconds, None for no bound."""
        return BatchPolicy(
            max_batch_size=self.max_batch_size,
            max_queue_delay_s=self.max_queue_delay_us / 1e6,
            preferred_batch_sizes=self.preferred_batch_sizes,
            max_queue_size=self.max_queue_size or None,
            instances=self.instances,
            enabled=self.dynamic_batching,
        )
