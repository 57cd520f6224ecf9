"""The side-by-side comparison: one `ShadowReport` per (model, shadow version) over pairs.

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

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from server.drift.profile import bin_counts, quantile_edges
from server.shadow.pairs import ShadowPair

PSI_BINS = 10


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
