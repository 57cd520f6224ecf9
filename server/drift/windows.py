"""The drift sidecar's ring buffers: the last rows (features, score, arrival time) of one
window key, and the last labelled rows with their rolling accuracy and AUC. Fixed size,
numpy-backed, no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from server.drift.stats import roc_auc


class RowWindow:
    """The last `capacity` rows (features and score) of one window key, with arrival times."""

    def __init__(self, capacity: int, n_features: int) -> None:
        self.capacity = capacity
        self.features = np.full((capacity, n_features), np.nan, dtype=np.float32)
        self.scores = np.full(capacity, np.nan, dtype=np.float32)
        self.times = np.full(capacity, -np.inf)
        self.size = 0
        self._next = 0

    def append(
        self, features: npt.NDArray[np.float32], scores: npt.NDArray[np.float32], now: float
    ) -> None:
        n = scores.shape[0]
        if n >= self.capacity:
            self.features[:] = features[-self.capacity :]
            self.scores[:] = scores[-self.capacity :]
            self.times[:] = now
            self.size, self._next = self.capacity, 0
            return
        start = self._next
        first = min(n, self.capacity - start)
        self.features[start : start + first] = features[:first]
        self.scores[start : start + first] = scores[:first]
        self.times[start : start + first] = now
        rest = n - first
        if rest:
            self.features[:rest] = features[first:]
            self.scores[:rest] = scores[first:]
            self.times[:rest] = now
        self._next = (start + n) % self.capacity
        self.size = min(self.capacity, self.size + n)

    def view(self, since: float) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
        """Rows that arrived at `since` or later (the filled part is always [0, size))."""
        mask = self.times[: self.size] >= since
        return self.features[: self.size][mask], self.scores[: self.size][mask]

    def oldest(self) -> float:
        return float(self.times[: self.size].min()) if self.size else math.inf


class LabelWindow:
    """The last `capacity` labelled rows: predicted label (-1: none), true label, score."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.predicted = np.full(capacity, -1, dtype=np.int64)
        self.truth = np.zeros(capacity, dtype=np.int64)
        self.scores = np.full(capacity, np.nan, dtype=np.float64)
        self.size = 0
        self._next = 0

    def append(
        self, predicted: Sequence[int], truth: Sequence[int], scores: Sequence[float]
    ) -> None:
        for p, t, s in zip(predicted, truth, scores, strict=True):
            i = self._next
            self.predicted[i], self.truth[i], self.scores[i] = p, t, s
            self._next = (i + 1) % self.capacity
            self.size = min(self.capacity, self.size + 1)

    def accuracy(self) -> float:
        have = self.predicted[: self.size] >= 0
        if not have.any():
            return math.nan
        return float(np.mean(self.predicted[: self.size][have] == self.truth[: self.size][have]))

    def auc(self) -> float:
        scores = self.scores[: self.size]
        finite = np.isfinite(scores)
        return roc_auc(self.truth[: self.size][finite], scores[finite])
