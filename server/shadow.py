"""Side-by-side shadow evaluation: the pairs (primary answer, shadow answer) of mirrored requests,
a bounded log of them, the report (`batchline shadow report`) and an automatic promotion gate.

Score-distribution PSI uses the drift monitor's definitions (one definition of each concept):
the bins are the deciles of the *primary* scores (`quantile_edges`: edges are observed values,
deduplicated, so a model with few distinct scores gets fewer, wider bins), counts per bin are
right-closed (`bin_counts`), and `server.drift.stats.psi` floors every share at
EPSILON = 1e-4 before ``sum((a - e) * ln(a / e))``, so a bin the shadow leaves empty contributes
about e * ln(e / 1e-4) (~0.92 for a decile) instead of infinity. Read it as drift: < 0.10 the
two score distributions match, 0.10-0.25 look closer, > 0.25 the shadow scores differently.

Percentiles (p50, p99) are numpy's default, linear interpolation between closest ranks.
"""

from __future__ import annotations

import argparse
import html
import json
import math
import os
import re
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from server.drift.profile import bin_counts, quantile_edges

PSI_BINS = 10
DEFAULT_MAX_PAIRS = 10_000
DEFAULT_MAX_BYTES = 64 * 1024 * 1024
DEFAULT_MAX_MEMORY_BYTES = 32 * 1024 * 1024
DEFAULT_BACKUPS = 3
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


class PairLog:
    """A bounded local log of shadow pairs: the newest `max_pairs` in memory, taking at most
    `max_memory_bytes` (see `pair_bytes`; older pairs go first, counted in `evicted` by the bound
    that pushed them out), and, with a `path`, an append-only JSON-lines file rotated to
    ``path.1`` .. ``path.<backups>`` when it would exceed `max_bytes` (so the disk holds at most
    about (backups + 1) * max_bytes).

    Shed and failure counts are only added up by `note_shed` / `note_failure` (O(1), no I/O) and
    written as one "counts" record with the next `append` or `flush`. Event-loop use only: not
    thread-safe. File writes are small and synchronous (one line, flushed) and happen on the
    mirror's side of the request path, never on the caller's.
    """

    def __init__(
        self,
        max_pairs: int = DEFAULT_MAX_PAIRS,
        *,
        path: str | os.PathLike[str] | None = None,
        max_bytes: int = DEFAULT_MAX_BYTES,
        backups: int = DEFAULT_BACKUPS,
        now_ns: Callable[[], int] = time.time_ns,
        max_memory_bytes: int = DEFAULT_MAX_MEMORY_BYTES,
    ) -> None:
        if max_pairs < 1:
            raise ValueError(f"max_pairs: expected an integer >= 1, got {max_pairs!r}")
        if max_memory_bytes < 1:
            raise ValueError(
                f"max_memory_bytes: expected an integer >= 1, got {max_memory_bytes!r}"
            )
        if max_bytes < 1:
            raise ValueError(f"max_bytes: expected an integer >= 1, got {max_bytes!r}")
        if backups < 0:
            raise ValueError(f"backups: expected an integer >= 0, got {backups!r}")
        self.max_pairs = max_pairs
        self.max_memory_bytes = max_memory_bytes
        self._pairs: deque[ShadowPair] = deque()
        self._pair_sizes: deque[int] = deque()  # pair_bytes of each pair held, in step
        self._memory_bytes = 0
        # Pairs pushed out of memory, by the bound that did it ("pairs": max_pairs, "bytes").
        self.evicted: dict[str, int] = {"pairs": 0, "bytes": 0}
        self._counts: deque[CountRecord] = deque(maxlen=max_pairs)
        self._pending_shed: dict[str, int] = {}
        self._pending_failed: dict[tuple[str, str], int] = {}
        self._now_ns = now_ns
        self.path = Path(path) if path is not None else None
        self.max_bytes = max_bytes
        self.backups = backups
        self._file: Any = None
        self._size = 0
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._open()

    def _open(self) -> None:
        assert self.path is not None
        self._file = self.path.open("a", encoding="utf-8")
        self._size = self.path.stat().st_size

    def append(self, pair: ShadowPair) -> None:
        self._write_counts()
        size = pair_bytes(pair)
        self._pairs.append(pair)
        self._pair_sizes.append(size)
        self._memory_bytes += size
        while self._pairs and (
            len(self._pairs) > self.max_pairs or self._memory_bytes > self.max_memory_bytes
        ):
            self.evicted["pairs" if len(self._pairs) > self.max_pairs else "bytes"] += 1
            self._pairs.popleft()
            self._memory_bytes -= self._pair_sizes.popleft()
        self._write({"type": "pair", **pair.to_dict()})

    @property
    def memory_bytes(self) -> int:
        """What the pairs held in memory are charged (pair_bytes), at most max_memory_bytes."""
        return self._memory_bytes

    def note_shed(self, model: str, n: int = 1) -> None:
        self._pending_shed[model] = self._pending_shed.get(model, 0) + n

    def note_failure(self, model: str, shadow_version: str, n: int = 1) -> None:
        key = (model, shadow_version)
        self._pending_failed[key] = self._pending_failed.get(key, 0) + n

    def flush(self) -> None:
        """Record the pending counts now (call it now and then, e.g. every few seconds)."""
        self._write_counts()
        if self._file is not None:
            self._file.flush()

    def pairs(self, since_ns: int | None = None) -> list[ShadowPair]:
        if since_ns is None:
            return list(self._pairs)
        return [p for p in self._pairs if p.time_unix_ns >= since_ns]

    def contents(self, since_ns: int | None = None) -> LogContents:
        """Pairs and counts held in memory, pending counts included."""
        out = LogContents(pairs=self.pairs(since_ns))
        for record in self._counts:
            if since_ns is None or record.time_unix_ns >= since_ns:
                out.add_counts(record)
        now = self._now_ns()
        for model, shed in self._pending_shed.items():
            out.add_counts(CountRecord(now, model, "", shed=shed))
        for (model, version), failed in self._pending_failed.items():
            out.add_counts(CountRecord(now, model, version, failed=failed))
        return out

    def close(self) -> None:
        self.flush()
        if self._file is not None:
            self._file.close()
            self._file = None

    def _write_counts(self) -> None:
        if not self._pending_shed and not self._pending_failed:
            return
        now = self._now_ns()
        records = [CountRecord(now, m, "", shed=n) for m, n in self._pending_shed.items()]
        records += [CountRecord(now, m, v, failed=n) for (m, v), n in self._pending_failed.items()]
        self._pending_shed.clear()
        self._pending_failed.clear()
        for record in records:
            self._counts.append(record)
            self._write({"type": "counts", **record.to_dict()})

    def _write(self, record: Mapping[str, Any]) -> None:
        if self._file is None:
            return
        line = json.dumps(record, separators=(",", ":")) + "\n"
        size = len(line.encode("utf-8"))
        if self._size > 0 and self._size + size > self.max_bytes:
            self._rotate()
        self._file.write(line)
        self._file.flush()
        self._size += size

    def _rotate(self) -> None:
        assert self.path is not None
        assert self._file is not None
        self._file.close()
        if self.backups == 0:
            self.path.unlink()
        else:
            for i in range(self.backups - 1, 0, -1):
                older = _backup(self.path, i)
                if older.exists():
                    older.replace(_backup(self.path, i + 1))
            self.path.replace(_backup(self.path, 1))
        self._open()


def _backup(path: Path, index: int) -> Path:
    return path.with_name(f"{path.name}.{index}")


def log_files(path: str | os.PathLike[str]) -> list[Path]:
    """The log and its rotated backups, oldest first."""
    base = Path(path)
    pattern = re.compile(re.escape(base.name) + r"\.(\d+)")
    backups = [
        (int(m.group(1)), p)
        for p in base.parent.glob(base.name + ".*")
        if (m := pattern.fullmatch(p.name)) is not None
    ]
    files = [p for _, p in sorted(backups, reverse=True)]
    if base.exists():
        files.append(base)
    return files


def read_log(path: str | os.PathLike[str], since_ns: int | None = None) -> LogContents:
    """Everything a JSON-lines pair log (with its backups) holds at or after `since_ns`.

    Lines that do not parse (a line cut short by a crash) are skipped and counted.
    """
    files = log_files(path)
    if not files:
        raise FileNotFoundError(f"no shadow pair log at {path}")
    out = LogContents()
    for file in files:
        with file.open(encoding="utf-8") as lines:
            for line in lines:
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                    kind = record.pop("type", "pair")
                    if since_ns is not None and int(record["time_unix_ns"]) < since_ns:
                        continue
                    if kind == "pair":
                        out.pairs.append(ShadowPair.from_dict(record))
                    elif kind == "counts":
                        out.add_counts(CountRecord(**record))
                    else:
                        out.skipped_lines += 1
                except (ValueError, KeyError, TypeError, AttributeError):
                    out.skipped_lines += 1
    return out


# ---- the comparison ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ShadowReport:
    """One shadow version of one model against what was served, over some pairs.

    `requests` counts pairs; `rows` the rows whose scores were compared (both finite);
    `label_agreement` the share of labelled rows whose labels agree. NaN where nothing was
    measured (no labels, no scores, no pairs).
    """

    model: str
    shadow_version: str
    primary_versions: tuple[str, ...]
    requests: int
    rows: int
    label_agreement: float
    mean_abs_diff: float
    p99_abs_diff: float
    psi: float
    primary_latency_p50_s: float
    primary_latency_p99_s: float
    shadow_latency_p50_s: float
    shadow_latency_p99_s: float
    shed: int = 0
    failures: int = 0
    first_unix_ns: int = 0
    last_unix_ns: int = 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: NaN becomes None."""
        out: dict[str, Any] = {}
        for name in self.__slots__:
            value = getattr(self, name)
            if isinstance(value, float) and math.isnan(value):
                value = None
            elif isinstance(value, tuple):
                value = list(value)
            out[name] = value
        return out


def _percentile(values: npt.NDArray[np.float64], q: float) -> float:
    return float(np.percentile(values, q)) if values.size else math.nan


def score_psi(primary: npt.ArrayLike, shadow: npt.ArrayLike) -> float:
    """PSI of the shadow scores against the primary's, over the primary's decile bins."""
    # Imported here: server.drift.stats pulls in scipy, which the serving path never needs.
    from server.drift.stats import psi

    p = np.asarray(primary, dtype=np.float64)
    if p.size == 0:
        return math.nan
    edges = quantile_edges(p, PSI_BINS)
    return psi(bin_counts(p, edges), bin_counts(shadow, edges))


def _report(
    model: str, version: str, pairs: Sequence[ShadowPair], shed: int, failures: int
) -> ShadowReport:
    primary = np.fromiter((s for p in pairs for s in p.primary_scores), dtype=np.float64)
    shadow = np.fromiter((s for p in pairs for s in p.shadow_scores), dtype=np.float64)
    both = np.isfinite(primary) & np.isfinite(shadow)
    primary, shadow = primary[both], shadow[both]
    diffs = np.abs(shadow - primary)
    labelled = sum(len(p.primary_labels) for p in pairs)
    agreeing = sum(
        a == b for p in pairs for a, b in zip(p.primary_labels, p.shadow_labels, strict=True)
    )
    p_lat = np.array([p.primary_latency_s for p in pairs], dtype=np.float64)
    s_lat = np.array([p.shadow_latency_s for p in pairs], dtype=np.float64)
    return ShadowReport(
        model=model,
        shadow_version=version,
        primary_versions=tuple(sorted({p.primary_version for p in pairs})),
        requests=len(pairs),
        rows=int(diffs.size),
        label_agreement=agreeing / labelled if labelled else math.nan,
        mean_abs_diff=float(diffs.mean()) if diffs.size else math.nan,
        p99_abs_diff=_percentile(diffs, 99),
        psi=score_psi(primary, shadow) if primary.size else math.nan,
        primary_latency_p50_s=_percentile(p_lat, 50),
        primary_latency_p99_s=_percentile(p_lat, 99),
        shadow_latency_p50_s=_percentile(s_lat, 50),
        shadow_latency_p99_s=_percentile(s_lat, 99),
        shed=shed,
        failures=failures,
        first_unix_ns=min((p.time_unix_ns for p in pairs), default=0),
        last_unix_ns=max((p.time_unix_ns for p in pairs), default=0),
    )


def compare(
    pairs: Iterable[ShadowPair],
    shed_count: int | Mapping[str, int] = 0,
    failures: Mapping[tuple[str, str], int] | None = None,
) -> list[ShadowReport]:
    """One report per (model, shadow version) over `pairs`, sorted by model then version.

    `shed_count` is mirrored work shed for a model (one number for every report, or a mapping
    by model name): shedding happens before the shadow is known, so it is per model.
    `failures` maps (model, shadow version) to shadow runs that failed; a version with failures
    and no pairs still gets a report.
    """
    groups: dict[tuple[str, str], list[ShadowPair]] = {}
    for pair in pairs:
        groups.setdefault((pair.model, pair.shadow_version), []).append(pair)
    failures = failures or {}
    for key in failures:
        groups.setdefault(key, [])

    def shed_for(model: str) -> int:
        if isinstance(shed_count, Mapping):
            return int(shed_count.get(model, 0))
        return int(shed_count)

    return [
        _report(
            model,
            version,
            groups[(model, version)],
            shed_for(model),
            failures.get((model, version), 0),
        )
        for model, version in sorted(groups)
    ]


# ---- the promotion gate -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class GateConfig:
    """When a shadow (or canary) may replace the primary: over at least `min_requests`
    requests, labels agree at least `min_agreement` of the time, scores differ by at most
    `max_mean_abs_diff` on average, and at most `max_error_rate` of its runs fail."""

    min_requests: int = 1000
    min_agreement: float = 0.99
    max_mean_abs_diff: float = 0.05
    max_error_rate: float = 0.01

    def __post_init__(self) -> None:
        if isinstance(self.min_requests, bool) or not isinstance(self.min_requests, int):
            raise ValueError(f"min_requests: expected an integer >= 1, got {self.min_requests!r}")
        if self.min_requests < 1:
            raise ValueError(f"min_requests: expected an integer >= 1, got {self.min_requests!r}")
        for name in ("min_agreement", "max_error_rate"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and 0.0 <= value <= 1.0):
                raise ValueError(f"{name}: expected a number in 0..1, got {value!r}")
        value = self.max_mean_abs_diff
        # inf is allowed (and documented): it turns the score check off for a model without
        # scores. NaN is refused (every comparison with it is false).
        if isinstance(value, bool) or not (isinstance(value, int | float) and value >= 0):
            raise ValueError(f"max_mean_abs_diff: expected a number >= 0 or inf, got {value!r}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> GateConfig:
        known = {"min_requests", "min_agreement", "max_mean_abs_diff", "max_error_rate"}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"{sorted(unknown)[0]}: unknown key")
        return cls(**data)


GateAction = Literal["promote", "rollback", "wait"]


@dataclass(frozen=True)
class GateDecision:
    """What the gate advises, why (one reason per check), and the numbers it decided on."""

    action: GateAction
    reasons: list[str]
    numbers: dict[str, float]

    def summary(self) -> str:
        """One log line: the action, its reasons and numbers."""
        numbers = ", ".join(f"{k}={v:.6g}" for k, v in self.numbers.items())
        return f"{self.action}: {'; '.join(self.reasons)} [{numbers}]"


def evaluate_gate(report: ShadowReport, errors: int, config: GateConfig) -> GateDecision:
    """Promote when every threshold holds over enough requests, roll back when one breaks,
    otherwise wait. `errors` counts the candidate's failed runs over the same window; the error
    rate is errors / (report.requests + errors). A threshold whose number was not measured
    (NaN: no labels, no scores) neither passes nor breaks: the gate waits. Set min_agreement
    to 0 (or max_mean_abs_diff to inf) to gate a model without labels (or scores)."""
    total = report.requests + errors
    error_rate = errors / total if total else math.nan
    numbers = {
        "requests": float(report.requests),
        "errors": float(errors),
        "error_rate": error_rate,
        "label_agreement": report.label_agreement,
        "mean_abs_diff": report.mean_abs_diff,
        "min_requests": float(config.min_requests),
        "min_agreement": config.min_agreement,
        "max_mean_abs_diff": config.max_mean_abs_diff,
        "max_error_rate": config.max_error_rate,
    }
    if total < config.min_requests:
        return GateDecision(
            "wait", [f"{total} of {config.min_requests} requests observed"], numbers
        )
    breaks: list[str] = []
    passes: list[str] = []
    unmeasured: list[str] = []
    if error_rate > config.max_error_rate:
        breaks.append(f"error rate {error_rate:.4f} > {config.max_error_rate:g}")
    else:
        passes.append(f"error rate {error_rate:.4f} <= {config.max_error_rate:g}")
    if config.min_agreement > 0:
        if math.isnan(report.label_agreement):
            unmeasured.append("label agreement not measured (no labels)")
        elif report.label_agreement < config.min_agreement:
            breaks.append(
                f"label agreement {report.label_agreement:.4f} < {config.min_agreement:g}"
            )
        else:
            passes.append(
                f"label agreement {report.label_agreement:.4f} >= {config.min_agreement:g}"
            )
    if math.isfinite(config.max_mean_abs_diff):
        if math.isnan(report.mean_abs_diff):
            unmeasured.append("score difference not measured (no scores)")
        elif report.mean_abs_diff > config.max_mean_abs_diff:
            breaks.append(
                f"mean |score diff| {report.mean_abs_diff:.4f} > {config.max_mean_abs_diff:g}"
            )
        else:
            passes.append(
                f"mean |score diff| {report.mean_abs_diff:.4f} <= {config.max_mean_abs_diff:g}"
            )
    if breaks:
        return GateDecision("rollback", breaks, numbers)
    if unmeasured:
        return GateDecision("wait", unmeasured, numbers)
    return GateDecision("promote", passes, numbers)


# ---- batchline shadow report ------------------------------------------------------------------

_WINDOW = re.compile(r"\s*([0-9]*\.?[0-9]+)\s*(ms|s|m|h|d)?\s*")
_UNIT_S = {"ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_window(text: str) -> float:
    """'90s', '10m', '2h', '1d', '500ms' or plain seconds -> seconds."""
    match = _WINDOW.fullmatch(text)
    if match is None:
        raise ValueError(f"--window: expected e.g. 30s, 10m, 2h or 1d, got {text!r}")
    number, unit = match.groups()
    return float(number) * _UNIT_S[unit or "s"]


def _fmt(value: float, scale: float = 1.0, digits: int = 4) -> str:
    return "-" if math.isnan(value) else f"{value * scale:.{digits}f}"


def render_text(reports: Sequence[ShadowReport], window_s: float | None) -> str:
    span = "the whole log" if window_s is None else f"the last {window_s:g} s"
    if not reports:
        return f"no shadow pairs in {span}\n"
    lines = [f"shadow comparison over {span}"]
    for r in reports:
        lines += [
            "",
            f"{r.model}: shadow version {r.shadow_version} vs {', '.join(r.primary_versions) or '-'}",
            f"  requests compared   {r.requests} ({r.rows} scored rows)",
            f"  label agreement     {_fmt(r.label_agreement)}",
            f"  |score diff|        mean {_fmt(r.mean_abs_diff)}  p99 {_fmt(r.p99_abs_diff)}",
            f"  score PSI           {_fmt(r.psi)}",
            f"  latency primary ms  p50 {_fmt(r.primary_latency_p50_s, 1e3, 3)}"
            f"  p99 {_fmt(r.primary_latency_p99_s, 1e3, 3)}",
            f"  latency shadow ms   p50 {_fmt(r.shadow_latency_p50_s, 1e3, 3)}"
            f"  p99 {_fmt(r.shadow_latency_p99_s, 1e3, 3)}",
            f"  shed (model)        {r.shed}",
            f"  shadow failures     {r.failures}",
        ]
    return "\n".join(lines) + "\n"


def _svg_histogram(diffs: npt.NDArray[np.float64], width: int = 480, height: int = 160) -> str:
    """An inline SVG histogram of signed score differences (shadow - primary)."""
    if diffs.size == 0:
        return "<p>no scored rows</p>"
    bound = float(np.max(np.abs(diffs))) or 1e-6
    counts, edges = np.histogram(diffs, bins=41, range=(-bound, bound))
    top = int(counts.max()) or 1
    bar = width / counts.size
    rects = []
    for i, c in enumerate(counts):
        h = (height - 20) * c / top
        rects.append(
            f'<rect x="{i * bar:.1f}" y="{height - 20 - h:.1f}" width="{bar - 1:.1f}" '
            f'height="{h:.1f}" fill="#4a7ab5"><title>{edges[i]:.4g}..{edges[i + 1]:.4g}: '
            f"{int(c)}</title></rect>"
        )
    mid = width / 2
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'role="img" aria-label="histogram of shadow minus primary scores">'
        + "".join(rects)
        + f'<line x1="{mid}" y1="0" x2="{mid}" y2="{height - 20}" stroke="#999"/>'
        + f'<text x="0" y="{height - 5}" font-size="11">{-bound:.3g}</text>'
        + f'<text x="{mid - 4}" y="{height - 5}" font-size="11">0</text>'
        + f'<text x="{width - 40}" y="{height - 5}" font-size="11">{bound:.3g}</text>'
        + "</svg>"
    )


def render_html(
    reports: Sequence[ShadowReport], pairs: Sequence[ShadowPair], window_s: float | None
) -> str:
    """A self-contained page: the report table and, per shadow, a histogram of differences."""
    e = html.escape
    columns: list[tuple[str, Callable[[ShadowReport], str]]] = [
        ("model", lambda r: r.model),
        ("shadow", lambda r: r.shadow_version),
        ("vs", lambda r: ", ".join(r.primary_versions)),
        ("requests", lambda r: str(r.requests)),
        ("agreement", lambda r: _fmt(r.label_agreement)),
        ("mean |diff|", lambda r: _fmt(r.mean_abs_diff)),
        ("p99 |diff|", lambda r: _fmt(r.p99_abs_diff)),
        ("PSI", lambda r: _fmt(r.psi)),
        (
            "primary p50/p99 ms",
            lambda r: (
                f"{_fmt(r.primary_latency_p50_s, 1e3, 3)} / {_fmt(r.primary_latency_p99_s, 1e3, 3)}"
            ),
        ),
        (
            "shadow p50/p99 ms",
            lambda r: (
                f"{_fmt(r.shadow_latency_p50_s, 1e3, 3)} / {_fmt(r.shadow_latency_p99_s, 1e3, 3)}"
            ),
        ),
        ("shed", lambda r: str(r.shed)),
        ("failures", lambda r: str(r.failures)),
    ]
    head = "".join(f"<th>{e(name)}</th>" for name, _ in columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{e(get(r))}</td>" for _, get in columns) + "</tr>" for r in reports
    )
    charts = []
    for r in reports:
        diffs = np.fromiter(
            (
                s - p
                for pair in pairs
                if pair.model == r.model and pair.shadow_version == r.shadow_version
                for p, s in zip(pair.primary_scores, pair.shadow_scores, strict=True)
                if math.isfinite(p) and math.isfinite(s)
            ),
            dtype=np.float64,
        )
        charts.append(
            f"<h2>{e(r.model)} {e(r.shadow_version)}: shadow &minus; primary score</h2>"
            + _svg_histogram(diffs)
        )
    span = "the whole log" if window_s is None else f"the last {window_s:g} s"
    return (
        '<!doctype html><html><head><meta charset="utf-8"><title>batchline shadow report'
        "</title><style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}</style></head><body>"
        f"<h1>Shadow comparison over {e(span)}</h1>"
        f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
        + "".join(charts)
        + "</body></html>\n"
    )


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Arguments of `batchline shadow report`; sets `func` to `run_report`."""
    parser.add_argument("--log", required=True, help="the JSON-lines shadow pair log")
    parser.add_argument(
        "--window", help="only pairs from the last 30s / 10m / 2h / 1d (default: the whole log)"
    )
    parser.add_argument("--format", choices=("text", "json"), default="text")
    parser.add_argument("--html", metavar="FILE", help="also write an HTML page with a chart")
    parser.set_defaults(func=run_report)


def run_report(args: argparse.Namespace, *, now_ns: Callable[[], int] = time.time_ns) -> int:
    try:
        window_s = parse_window(args.window) if args.window else None
    except ValueError as exc:
        print(f"batchline shadow report: {exc}", file=sys.stderr)
        return 2
    since = None if window_s is None else now_ns() - int(window_s * 1e9)
    try:
        contents = read_log(args.log, since)
    except OSError as exc:
        print(f"batchline shadow report: {exc}", file=sys.stderr)
        return 2
    reports = compare(contents.pairs, contents.shed, contents.failures)
    if args.format == "json":
        print(
            json.dumps(
                {
                    "window_s": window_s,
                    "skipped_lines": contents.skipped_lines,
                    "reports": [r.to_dict() for r in reports],
                },
                indent=2,
            )
        )
    else:
        sys.stdout.write(render_text(reports, window_s))
        if contents.skipped_lines:
            print(f"({contents.skipped_lines} unreadable log lines skipped)")
    if args.html:
        Path(args.html).write_text(render_html(reports, contents.pairs, window_s), "utf-8")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """`batchline shadow report` on its own: argv holds what follows `report`."""
    parser = argparse.ArgumentParser(
        prog="batchline shadow report",
        description="Compare shadow versions with the served ones from a pair log.",
    )
    configure_parser(parser)
    args = parser.parse_args(argv)
    return run_report(args)


__all__ = [
    "CountRecord",
    "GateConfig",
    "GateDecision",
    "LogContents",
    "PairLog",
    "ShadowPair",
    "ShadowReport",
    "compare",
    "configure_parser",
    "evaluate_gate",
    "label_rows",
    "main",
    "parse_window",
    "read_log",
    "render_html",
    "render_text",
    "run_report",
    "score_psi",
    "score_rows",
]
