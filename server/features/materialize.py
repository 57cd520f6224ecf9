"""`batchline features materialize`: offline rows (CSV or Parquet) -> the online store.

It reads through `FeatureView.row_values` and writes through `FeatureView.pack`, the same code
serving reads back with, and returns exactly the matrix it stored, so a test can prove the
online vectors equal what was read offline, byte for byte.

`read_table` reads CSV, JSON (an array of objects, or one object per line) or Parquet with its
column names; `check_table` refuses, before anything is written, a table that lacks the view's
entity key or one of its features (naming the columns found and those missing) or has no rows.
"""

from __future__ import annotations

import csv
import json
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
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


@dataclass
class Table:
    """An offline table: its column names (in file order) and its rows."""

    columns: tuple[str, ...]
    rows: list[Mapping[str, Any]] = field(default_factory=list)


JSON_SUFFIXES = (".json", ".jsonl", ".ndjson")
PARQUET_SUFFIXES = (".parquet", ".pq")


def read_table(path: Path) -> Table:
    """A CSV, JSON or Parquet file (by suffix; anything else is read as CSV).

    Raises ValueError for a file that does not parse (OSError for one that cannot be read).
    """
    suffix = path.suffix.lower()
    if suffix in PARQUET_SUFFIXES:
        try:
            import pyarrow.parquet as pq  # type: ignore[import-untyped]
        except ImportError as exc:  # pragma: no cover - optional
            raise ValueError("reading Parquet needs pyarrow (pip install pyarrow)") from exc
        try:
            table = pq.read_table(path)
        except Exception as exc:  # pyarrow's own error types
            raise ValueError(f"not a readable Parquet file: {exc}") from exc
        return Table(tuple(table.column_names), table.to_pylist())
    if suffix in JSON_SUFFIXES:
        return _read_json(path)
    with open(path, newline="") as fh:
        try:
            reader = csv.DictReader(fh)
            rows: list[Mapping[str, Any]] = list(reader)
        except (csv.Error, UnicodeDecodeError) as exc:
            raise ValueError(f"not a readable CSV file: {exc}") from exc
        return Table(tuple(reader.fieldnames or ()), rows)


def read_rows(path: Path) -> Iterator[Mapping[str, Any]]:
    """Rows of a CSV, JSON or Parquet file as mappings."""
    yield from read_table(path).rows


def check_table(view: FeatureView, table: Table) -> None:
    """The table must have rows, the view's entity key column and every feature column."""
    found = ", ".join(table.columns) or "none"
    if not table.rows and not table.columns:
        raise ValueError("no rows")
    if view.entity_key not in table.columns:
        raise ValueError(
            f"no {view.entity_key!r} column, the entity key of feature view {view.name} "
            f"(columns found: {found})"
        )
    missing = [name for name in view.feature_names if name not in table.columns]
    if missing:
        shown = ", ".join(missing[:20]) + (" ..." if len(missing) > 20 else "")
        raise ValueError(
            f"{len(missing)} of the {view.width} features of view {view.name} have no column: "
            f"{shown} (columns found: {found})"
        )
    if not table.rows:
        raise ValueError(f"no rows (columns found: {found})")
    if not any(_entity(row, view.entity_key) for row in table.rows):
        raise ValueError(f"no row has a {view.entity_key!r} value ({len(table.rows)} rows)")


def _entity(row: Mapping[str, Any], key: str) -> str | None:
    value = row.get(key)
    return None if value is None or str(value) == "" else str(value)


def _read_json(path: Path) -> Table:
    """An array of objects, or JSON lines (one object per line)."""
    text = path.read_text()
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        data = None
        try:
            data = [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as exc:
            raise ValueError(
                f"not JSON (an array of objects, or one object per line): {exc}"
            ) from None
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list) or not all(isinstance(row, dict) for row in data):
        raise ValueError("expected an array of objects (one per row), or one object per line")
    columns: dict[str, None] = {}
    for row in data:
        columns.update(dict.fromkeys(str(k) for k in row))
    return Table(tuple(columns), data)


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
