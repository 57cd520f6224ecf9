"""Drift statistics: PSI, two-sample KS, Jensen-Shannon, missing and out-of-range rates, AUC,
and the alert gate. Pure numpy/scipy; no transport, no metrics library.

PSI (population stability index) over the reference's fixed bins::

    PSI = sum_i (a_i - e_i) * ln(a_i / e_i)

with e_i the reference share and a_i the current share of bin i. An empty bin would make the
logarithm infinite, so both shares are floored at EPSILON = 1e-4 (one in ten thousand) before the
sum; the floored shares are not renormalised. With 10 bins the floor bounds one empty bin's
contribution to about e_i * ln(e_i / 1e-4) ~ 0.92 for e_i = 0.1: large, as an emptied bin
should be, but finite. Reading: < 0.10 stable, 0.10-0.25 investigate, > 0.25 act (retrain).

Jensen-Shannon distance (base 2, so it lies in [0, 1]: 0 identical, 1 disjoint) uses the same
bins and needs no floor. KS compares the raw current values with the reference sample.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from scipy import stats as _scipy_stats

from server.drift.profile import Histogram, bin_counts

EPSILON = 1e-4
PSI_INVESTIGATE = 0.10
PSI_ACT = 0.25


def _shares(values: npt.ArrayLike) -> npt.NDArray[np.float64]:
    arr = np.asarray(values, dtype=np.float64)
    total = arr.sum()
    return arr / total if total > 0 else arr


def psi(expected: npt.ArrayLike, actual: npt.ArrayLike, eps: float = EPSILON) -> float:
    """PSI between two histograms over the same bins (shares or counts; each is normalised).

    NaN when either histogram is empty.
    """
    e = np.asarray(expected, dtype=np.float64)
    a = np.asarray(actual, dtype=np.float64)
    if e.shape != a.shape:
        raise ValueError(f"histograms differ in bins: {e.shape} vs {a.shape}")
    if e.sum() <= 0 or a.sum() <= 0:
        return math.nan
    e = np.maximum(_shares(e), eps)
    a = np.maximum(_shares(a), eps)
    return float(np.sum((a - e) * np.log(a / e)))


def psi_level(value: float) -> str:
    """stable (< 0.10), investigate (0.10..0.25), act (> 0.25); empty for NaN."""
    if math.isnan(value):
        return "empty"
    if value < PSI_INVESTIGATE:
        return "stable"
    if value <= PSI_ACT:
        return "investigate"
    return "act"


def js_distance(p: npt.ArrayLike, q: npt.ArrayLike) -> float:
    """Jensen-Shannon distance, base 2 (sqrt of the divergence): 0 identical, 1 disjoint."""
    ps = np.asarray(p, dtype=np.float64)
    qs = np.asarray(q, dtype=np.float64)
    if ps.shape != qs.shape:
        raise ValueError(f"histograms differ in bins: {ps.shape} vs {qs.shape}")
    if ps.sum() <= 0 or qs.sum() <= 0:
        return math.nan
    ps, qs = _shares(ps), _shares(qs)
    m = 0.5 * (ps + qs)

    def kl(x: npt.NDArray[np.float64]) -> float:
        nz = x > 0  # 0 * log 0 = 0; m > 0 wherever x > 0
        return float(np.sum(x[nz] * np.log2(x[nz] / m[nz])))

    divergence = 0.5 * kl(ps) + 0.5 * kl(qs)
    return math.sqrt(min(max(divergence, 0.0), 1.0))


def ks_test(reference: npt.ArrayLike, current: npt.ArrayLike) -> tuple[float, float]:
    """Two-sample Kolmogorov-Smirnov statistic and p-value on the finite values: scipy's
    `ks_2samp` (method "auto": exact p-value up to 10,000 values a side, asymptotic above).

    An earlier version took the p-value from Stephens' approximation of the Kolmogorov limit for
    large samples; it was 1-11 % off scipy for windows of a few hundred to a few thousand rows.
    scipy costs ~1-7 ms per feature at 2,000 x 5,000 values, paid in the sidecar, off the
    serving path. NaN, NaN when either side has no finite value.
    """
    ref = _finite(reference)
    cur = _finite(current)
    if ref.size == 0 or cur.size == 0:
        return math.nan, math.nan
    result = _scipy_stats.ks_2samp(ref, cur)
    return float(result.statistic), min(max(float(result.pvalue), 0.0), 1.0)


def missing_rate(values: npt.ArrayLike) -> float:
    """Share of non-finite values (NaN, +-inf); NaN for no values at all."""
    arr = np.asarray(values, dtype=np.float64)
    if arr.size == 0:
        return math.nan
    return float(np.count_nonzero(~np.isfinite(arr)) / arr.size)


def out_of_range_rate(values: npt.ArrayLike, low: float, high: float) -> float:
    """Share of the finite values outside the reference's [low, high]; NaN when there is no
    finite value or the reference has no range (an all-missing reference: NaN bounds)."""
    finite = _finite(values)
    if finite.size == 0 or math.isnan(low) or math.isnan(high):
        return math.nan
    return float(np.count_nonzero((finite < low) | (finite > high)) / finite.size)


def roc_auc(y_true: npt.ArrayLike, scores: npt.ArrayLike) -> float:
    """Area under the ROC curve (Mann-Whitney U, ties counted half), as sklearn's
    `roc_auc_score` for binary labels: the larger of the two label values is the positive class
    (so {0, 1}, {-1, 1}, {False, True} and {1, 2} all work). NaN where AUC is undefined: fewer or
    more than two classes, or no values."""
    y = np.asarray(y_true).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    if y.size != s.size:
        raise ValueError(f"labels and scores differ in length: {y.size} vs {s.size}")
    classes = np.unique(y)
    if classes.size != 2:
        return math.nan
    positive = y == classes[1]
    n_pos = int(np.count_nonzero(positive))
    n_neg = y.size - n_pos
    ranks = _scipy_stats.rankdata(s)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


@dataclass(frozen=True, slots=True)
class Comparison:
    """Current values of one variable against its reference Histogram."""

    psi: float
    level: str
    ks_statistic: float
    ks_pvalue: float
    js_distance: float
    missing_rate: float
    out_of_range_rate: float
    count: int
    current_shares: tuple[float, ...]


def compare(reference: Histogram, values: npt.ArrayLike) -> Comparison:
    """Every statistic of `values` against `reference` (NaN where there is nothing to compare)."""
    arr = np.asarray(values, dtype=np.float64).ravel()
    counts = bin_counts(arr, reference.edges)
    total = int(counts.sum())
    value = psi(reference.shares, counts)
    ks_stat, ks_p = ks_test(reference.sample, arr)
    return Comparison(
        psi=value,
        level=psi_level(value),
        ks_statistic=ks_stat,
        ks_pvalue=ks_p,
        js_distance=js_distance(reference.shares, counts),
        missing_rate=missing_rate(arr),
        out_of_range_rate=out_of_range_rate(arr, reference.min, reference.max),
        count=total,
        current_shares=tuple(float(c) / total for c in counts) if total else (),
    )


class AlertGate:
    """Decides when a threshold crossing fires: once per crossing, and at most once per
    cool-down per key.

    A key (rule, model, version, role, feature) becomes active when its value breaches and
    inactive when it stops breaching. Becoming active fires only if the key has not fired within
    `cooldown_s`; staying active never fires again. Time is the caller's (monotonic seconds).
    Memory: keys that are inactive and out of their cool-down are forgotten.
    """

    def __init__(self, cooldown_s: float) -> None:
        self.cooldown_s = cooldown_s
        self._active: set[Hashable] = set()
        self._fired_at: dict[Hashable, float] = {}

    def update(self, key: Hashable, breached: bool, now: float) -> bool:
        """Record the latest evaluation of `key`; True when this one should fire."""
        if not breached:
            self._active.discard(key)
            fired = self._fired_at.get(key)
            if fired is not None and now - fired >= self.cooldown_s:
                del self._fired_at[key]
            return False
        if key in self._active:
            return False
        self._active.add(key)
        fired = self._fired_at.get(key)
        if fired is not None and now - fired < self.cooldown_s:
            return False
        self._fired_at[key] = now
        return True

    def is_active(self, key: Hashable) -> bool:
        return key in self._active

    def known(self) -> list[tuple[Hashable, bool]]:
        """Every key that is active or within its cool-down, with whether it is active."""
        keys = set(self._active) | set(self._fired_at)
        return [(key, key in self._active) for key in keys]

    def forget(self, predicate: Callable[[Hashable], bool]) -> None:
        """Drop every key for which `predicate(key)` is true (a window that went away)."""
        self._active = {k for k in self._active if not predicate(k)}
        self._fired_at = {k: t for k, t in self._fired_at.items() if not predicate(k)}


def _finite(values: npt.ArrayLike) -> npt.NDArray[np.float64]:
    arr = np.asarray(values, dtype=np.float64).ravel()
    return arr[np.isfinite(arr)]
