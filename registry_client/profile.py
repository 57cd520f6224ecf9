"""Reference profiles: what a model version's inputs and scores looked like when it was built.

A profile is computed once, from the training data, when a version is registered, and stored with
it as the ``profile.json`` attachment; the drift sidecar compares live traffic with it. Pure
numpy, so the registry side (``build-demo``, ``registry register``) and the server side
(``server.drift``, which re-exports this module) share one definition of the binning.

Binning: interior edges are the reference quantiles (deciles by default), deduplicated, and the
outer bins are open-ended, so every value lands in a bin: bins are ``(-inf, e0]``, ``(e0, e1]``,
..., ``(e_last, +inf)``. Right-closed bins keep a discrete value that sits on an edge (a 0/1
feature, say) in one bin. Non-finite values (NaN, +-inf) count as missing, never as binned.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

PROFILE_FILE = "profile.json"
PROFILE_SCHEMA = 1
DEFAULT_BINS = 10
DEFAULT_SAMPLE_ROWS = 2000
SCORE_NAME = "score"

FloatArray = npt.NDArray[np.float64]


def quantile_edges(values: npt.ArrayLike, bins: int = DEFAULT_BINS) -> FloatArray:
    """Interior bin edges at the 1/bins ... (bins-1)/bins quantiles of the finite values,
    deduplicated (so a discrete variable gets fewer, wider bins)."""
    if bins < 2:
        raise ValueError(f"bins: expected >= 2, got {bins}")
    finite = _finite(values)
    if finite.size == 0:
        return np.empty(0, dtype=np.float64)
    quantiles = np.linspace(0.0, 1.0, bins + 1)[1:-1]
    # No interpolation: every edge is a value seen, so a discrete variable keeps its atoms whole.
    return np.unique(np.quantile(finite, quantiles, method="lower"))


def bin_counts(values: npt.ArrayLike, edges: npt.ArrayLike) -> npt.NDArray[np.int64]:
    """Counts of the finite values per bin: len(edges) + 1 bins, right-closed, open-ended."""
    edges_arr = np.asarray(edges, dtype=np.float64)
    finite = _finite(values)
    index = np.searchsorted(edges_arr, finite, side="left")
    return np.bincount(index, minlength=edges_arr.size + 1).astype(np.int64, copy=False)


def bin_shares(values: npt.ArrayLike, edges: npt.ArrayLike) -> FloatArray:
    """Shares of the finite values per bin (all zeros when there are none)."""
    counts = bin_counts(values, edges)
    total = counts.sum()
    if total == 0:
        return np.zeros(counts.size, dtype=np.float64)
    return counts / float(total)


@dataclass(frozen=True, eq=False)
class Histogram:
    """The reference distribution of one variable (a feature or the score)."""

    name: str
    edges: FloatArray
    shares: FloatArray
    min: float
    max: float
    mean: float
    std: float
    missing_rate: float
    count: int
    # A bounded random sample of the finite reference values, for two-sample tests (KS).
    sample: FloatArray

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "edges": [float(e) for e in self.edges],
            "shares": [float(s) for s in self.shares],
            "min": self.min,
            "max": self.max,
            "mean": self.mean,
            "std": self.std,
            "missing_rate": self.missing_rate,
            "count": self.count,
            # float32 precision is what the model saw; 7 significant digits keep the file small.
            "sample": [float(f"{v:.7g}") for v in self.sample],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Histogram:
        edges = np.asarray(data["edges"], dtype=np.float64)
        shares = np.asarray(data["shares"], dtype=np.float64)
        if shares.size != edges.size + 1:
            raise ValueError(
                f"{data.get('name')!r}: {shares.size} shares for {edges.size} edges "
                f"(expected {edges.size + 1})"
            )
        if edges.size and np.any(np.diff(edges) <= 0):
            raise ValueError(f"{data.get('name')!r}: edges are not strictly increasing")
        return cls(
            name=str(data["name"]),
            edges=edges,
            shares=shares,
            min=float(data["min"]),
            max=float(data["max"]),
            mean=float(data["mean"]),
            std=float(data["std"]),
            missing_rate=float(data["missing_rate"]),
            count=int(data["count"]),
            sample=np.asarray(data["sample"], dtype=np.float64),
        )


@dataclass(frozen=True, eq=False)
class ReferenceProfile:
    """The reference of one model version: a Histogram per input feature (in the model's
    feature order) and one for the score."""

    features: tuple[Histogram, ...]
    score: Histogram
    rows: int
    bins: int = DEFAULT_BINS

    @property
    def n_features(self) -> int:
        return len(self.features)

    @property
    def feature_names(self) -> tuple[str, ...]:
        return tuple(h.name for h in self.features)

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": PROFILE_SCHEMA,
            "rows": self.rows,
            "bins": self.bins,
            "features": [h.to_dict() for h in self.features],
            "score": self.score.to_dict(),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ReferenceProfile:
        if data.get("schema") != PROFILE_SCHEMA:
            raise ValueError(f"profile schema {data.get('schema')!r}, expected {PROFILE_SCHEMA}")
        return cls(
            features=tuple(Histogram.from_dict(f) for f in data["features"]),
            score=Histogram.from_dict(data["score"]),
            rows=int(data["rows"]),
            bins=int(data.get("bins", DEFAULT_BINS)),
        )

    @classmethod
    def from_json(cls, text: str | bytes) -> ReferenceProfile:
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("a profile is a JSON object")
        return cls.from_dict(data)


def build_histogram(
    name: str,
    values: npt.ArrayLike,
    *,
    bins: int = DEFAULT_BINS,
    sample_rows: int = DEFAULT_SAMPLE_ROWS,
    rng: np.random.Generator | None = None,
) -> Histogram:
    """The reference Histogram of one variable."""
    arr = np.asarray(values, dtype=np.float64).ravel()
    finite = _finite(arr)
    edges = quantile_edges(finite, bins)
    if finite.size > sample_rows:
        rng = rng or np.random.default_rng(0)
        sample = np.sort(rng.choice(finite, sample_rows, replace=False))
    else:
        sample = np.sort(finite)
    empty = finite.size == 0
    return Histogram(
        name=name,
        edges=edges,
        shares=bin_shares(finite, edges),
        min=math.nan if empty else float(finite.min()),
        max=math.nan if empty else float(finite.max()),
        mean=math.nan if empty else float(finite.mean()),
        std=math.nan if empty else float(finite.std()),
        missing_rate=0.0 if arr.size == 0 else 1.0 - finite.size / arr.size,
        count=int(finite.size),
        sample=sample,
    )


def build_profile(
    X: npt.ArrayLike,
    scores: npt.ArrayLike,
    *,
    feature_names: Sequence[str] | None = None,
    bins: int = DEFAULT_BINS,
    sample_rows: int = DEFAULT_SAMPLE_ROWS,
    seed: int = 0,
) -> ReferenceProfile:
    """Profile a version from its reference rows X [n, n_features] and scores [m].

    X and scores need not be the same rows: the demo profiles the features on the training set
    and the scores on the holdout, which is what the model's scores look like on unseen data.
    """
    matrix = np.asarray(X, dtype=np.float64)
    if matrix.ndim != 2:
        raise ValueError(f"X: expected a 2-d array [rows, features], got shape {matrix.shape}")
    names = (
        tuple(feature_names)
        if feature_names is not None
        else tuple(f"f{i}" for i in range(matrix.shape[1]))
    )
    if len(names) != matrix.shape[1]:
        raise ValueError(f"{len(names)} feature names for {matrix.shape[1]} columns")
    rng = np.random.default_rng(seed)
    features = tuple(
        build_histogram(name, matrix[:, j], bins=bins, sample_rows=sample_rows, rng=rng)
        for j, name in enumerate(names)
    )
    score = build_histogram(SCORE_NAME, scores, bins=bins, sample_rows=sample_rows, rng=rng)
    return ReferenceProfile(features=features, score=score, rows=int(matrix.shape[0]), bins=bins)


def _finite(values: npt.ArrayLike) -> FloatArray:
    arr = np.asarray(values, dtype=np.float64).ravel()
    return arr[np.isfinite(arr)]
