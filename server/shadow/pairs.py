"""A shadow pair (what the served version answered and what the shadow would have), the
counts of mirrored work that produced no pair, and what reading a log gives back. The one
job: the records the log, the report and the gate share.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

# What a pair held in memory costs besides its strings' characters and its rows: the object,
# its five str headers, four tuples and number objects (617 bytes by sys.getsizeof; rounded up). Each row adds two scores (a float object and its
# tuple slot: 32 bytes each) and two labels (36 each, an int object that is not cached).
PAIR_OVERHEAD_BYTES = 640
PAIR_ROW_SCORE_BYTES = 32
PAIR_ROW_LABEL_BYTES = 36


def _str_bytes(text: str) -> int:
    return len(text) if text.isascii() else 4 * len(text)


def pair_bytes(pair: ShadowPair) -> int:
    """What one pair is charged against PairLog's `max_memory_bytes` (an upper bound)."""
    return (
        PAIR_OVERHEAD_BYTES
        + _str_bytes(pair.model)
        + _str_bytes(pair.primary_version)
        + _str_bytes(pair.shadow_version)
        + _str_bytes(pair.request_id)
        + _str_bytes(pair.entity_id)
        + PAIR_ROW_SCORE_BYTES * (len(pair.primary_scores) + len(pair.shadow_scores))
        + PAIR_ROW_LABEL_BYTES * (len(pair.primary_labels) + len(pair.shadow_labels))
    )


def score_rows(scores: npt.ArrayLike | None) -> tuple[float, ...]:
    """One score per row: [rows] as is, [rows, classes] -> the last column (the positive class
    of a binary classifier), as the drift producer reads scores."""
    if scores is None:
        return ()
    arr = np.asarray(scores, dtype=np.float64)
    if arr.ndim == 2:
        arr = arr[:, -1]
    return tuple(float(v) for v in arr.ravel())


def label_rows(labels: npt.ArrayLike | None) -> tuple[int, ...]:
    if labels is None:
        return ()
    return tuple(int(v) for v in np.asarray(labels).ravel())


@dataclass(frozen=True, slots=True)
class ShadowPair:
    """One mirrored request: what the serving version answered and what the shadow would have.

    `primary_version` is the version that answered the caller (the canary, for a request the
    split sent there). Scores and labels are per row; either may be empty (a model without a
    score or without labels), but each pair of sequences has one length.
    """

    model: str
    primary_version: str
    shadow_version: str
    request_id: str
    entity_id: str
    time_unix_ns: int
    primary_scores: tuple[float, ...]
    shadow_scores: tuple[float, ...]
    primary_labels: tuple[int, ...]
    shadow_labels: tuple[int, ...]
    primary_latency_s: float
    shadow_latency_s: float

    def __post_init__(self) -> None:
        if len(self.primary_scores) != len(self.shadow_scores):
            raise ValueError(
                f"shadow_scores: {len(self.shadow_scores)} rows, primary_scores has "
                f"{len(self.primary_scores)}"
            )
        if len(self.primary_labels) != len(self.shadow_labels):
            raise ValueError(
                f"shadow_labels: {len(self.shadow_labels)} rows, primary_labels has "
                f"{len(self.primary_labels)}"
            )

    @classmethod
    def from_outputs(
        cls,
        *,
        model: str,
        primary_version: str,
        shadow_version: str,
        request_id: str,
        entity_id: str,
        time_unix_ns: int,
        primary_scores: npt.ArrayLike | None,
        shadow_scores: npt.ArrayLike | None,
        primary_labels: npt.ArrayLike | None,
        shadow_labels: npt.ArrayLike | None,
        primary_latency_s: float,
        shadow_latency_s: float,
    ) -> ShadowPair:
        """Build a pair from output tensors (see `score_rows` for 2-D probabilities)."""
        return cls(
            model=model,
            primary_version=primary_version,
            shadow_version=shadow_version,
            request_id=request_id,
            entity_id=entity_id,
            time_unix_ns=int(time_unix_ns),
            primary_scores=score_rows(primary_scores),
            shadow_scores=score_rows(shadow_scores),
            primary_labels=label_rows(primary_labels),
            shadow_labels=label_rows(shadow_labels),
            primary_latency_s=float(primary_latency_s),
            shadow_latency_s=float(shadow_latency_s),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "primary_version": self.primary_version,
            "shadow_version": self.shadow_version,
            "request_id": self.request_id,
            "entity_id": self.entity_id,
            "time_unix_ns": self.time_unix_ns,
            "primary_scores": list(self.primary_scores),
            "shadow_scores": list(self.shadow_scores),
            "primary_labels": list(self.primary_labels),
            "shadow_labels": list(self.shadow_labels),
            "primary_latency_s": self.primary_latency_s,
            "shadow_latency_s": self.shadow_latency_s,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ShadowPair:
        return cls(
            model=str(data["model"]),
            primary_version=str(data["primary_version"]),
            shadow_version=str(data["shadow_version"]),
            request_id=str(data.get("request_id", "")),
            entity_id=str(data.get("entity_id", "")),
            time_unix_ns=int(data["time_unix_ns"]),
            primary_scores=tuple(float(v) for v in data.get("primary_scores", ())),
            shadow_scores=tuple(float(v) for v in data.get("shadow_scores", ())),
            primary_labels=tuple(int(v) for v in data.get("primary_labels", ())),
            shadow_labels=tuple(int(v) for v in data.get("shadow_labels", ())),
            primary_latency_s=float(data["primary_latency_s"]),
            shadow_latency_s=float(data["shadow_latency_s"]),
        )


@dataclass(frozen=True, slots=True)
class CountRecord:
    """Mirrored work that produced no pair: `shed` per model (shadow_version ""), `failed` per
    shadow version, accumulated since the previous record."""

    time_unix_ns: int
    model: str
    shadow_version: str
    shed: int = 0
    failed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "time_unix_ns": self.time_unix_ns,
            "model": self.model,
            "shadow_version": self.shadow_version,
            "shed": self.shed,
            "failed": self.failed,
        }


@dataclass(slots=True)
class LogContents:
    """Pairs and counts read back from a log (memory or file), within a window."""

    pairs: list[ShadowPair] = field(default_factory=list)
    shed: dict[str, int] = field(default_factory=dict)
    failures: dict[tuple[str, str], int] = field(default_factory=dict)
    skipped_lines: int = 0

    def add_counts(self, record: CountRecord) -> None:
        if record.shed:
            self.shed[record.model] = self.shed.get(record.model, 0) + record.shed
        if record.failed:
            key = (record.model, record.shadow_version)
            self.failures[key] = self.failures.get(key, 0) + record.failed
