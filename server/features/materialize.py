"""`batchline features materialize`: offline rows (CSV or Parquet) -> the online store.

It reads through `FeatureView.row_values` and writes through `FeatureView.pack`, the same code
serving reads back with, and returns exactly the matrix it stored, so a test can prove the
online vectors equal what was read offline, byte for byte.
"""

from __future__ import annotations

import csv
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from server.features.store import FeatureStore
from server.features.view import FeatureView


@dataclass
class Materialized:
    entities: list[str]
    matrix: np.ndarray  # [N, F] float32 as stored (NaN where a value was missing or bad)
    bad_values: int
    skipped_rows: int


def read_rows(path: Path) -> Iterator[Mapping[str, Any]]:
    """Rows of a CSV file (or Parquet, when pyarrow is installed) as mappings."""
    if path.suffix.lower() in (".parquet", ".pq"):
        try:
            import pyarrow.parquet as pq  # type: ignore[import-untyped]
        except ImportError as exc:  # pragma: no cover - optional
            raise ValueError(
                f"{path}: reading Parquet needs pyarrow (pip install pyarrow)"
            ) from exc
        yield from pq.read_table(path).to_pylist()
        return
    with open(path, newline="") as fh:
        yield from csv.DictReader(fh)


async def materialize(
    view: FeatureView,
    rows: Iterable[Mapping[str, Any]],
    store: FeatureStore,
    *,
    updated_at: float | None = None,
    chunk: int = 5000,
) -> Materialized:
    """Write every row's features under its entity id; rows without an id are skipped.

    A file that names one entity twice is refused before anything is written (ValueError naming
    the ids): the store keeps one vector per id, so "the last row wins" would serve something
    other than what an offline job reading the same file would see.
    """
    stamp = time.time_ns() / 1e9 if updated_at is None else updated_at
    rows = list(rows)
    seen: set[str] = set()
    repeated: list[str] = []
    for row in rows:
        entity = row.get(view.entity_key)
        if entity is None or str(entity) == "":
            continue
        key = str(entity)
        if key in seen and key not in repeated:
            repeated.append(key)
        seen.add(key)
    if repeated:
        shown = ", ".join(repeated[:10]) + (" ..." if len(repeated) > 10 else "")
        raise ValueError(
            f"{len(repeated)} {view.entity_key} value(s) appear on more than one row: {shown}; "
            "keep one row per entity (e.g. the latest) and materialize again"
        )
    entities: list[str] = []
    vectors: list[np.ndarray] = []
    bad = 0
    skipped = 0
    pending: list[tuple[str, bytes]] = []
    for row in rows:
        entity = row.get(view.entity_key)
        if entity is None or str(entity) == "":
            skipped += 1
            continue
        values, row_bad = view.row_values(row)
        bad += row_bad
        entity = str(entity)
        entities.append(entity)
        vectors.append(values)
        pending.append((view.key(entity), view.pack(values, stamp)))
        if len(pending) >= chunk:
            await store.write(pending)
            pending = []
    if pending:
        await store.write(pending)
    matrix = np.vstack(vectors) if vectors else np.empty((0, view.width), dtype=np.float32)
    return Materialized(entities, matrix, bad, skipped)
