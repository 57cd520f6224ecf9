"""FeatureView: the one definition of a model's features, online and offline.

Stored with each model version in the registry (`feature_view.json`). It names the entity key,
the ordered features the model's input expects and a default for each, the store's key layout,
a freshness rule and what to do with missing entities and failed lookups. `to_matrix` is the one
function that turns stored vectors into the model's input; `materialize` and serving both use it,
so training and serving cannot disagree on feature order or missing-value handling.

Stored layout ("packed"): one key per entity, `<key_prefix><entity id>`, holding an 8-byte
little-endian float64 update time (unix seconds) followed by the features as little-endian
float32 in view order. A missing or non-numeric value is stored as NaN. One MGET fetches any
number of entities in one round trip, and decoding a row is one np.frombuffer; a hash per entity
(HMGET, one field per feature) was measured slower by several times (see README) because every
field comes back as a string to parse.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from server.errors import NotFound

_FLOAT32_MAX = float(np.finfo(np.float32).max)

_TIME = struct.Struct("<d")


@dataclass(frozen=True)
class Feature:
    name: str
    default: float = 0.0


@dataclass(frozen=True)
class FeatureView:
    """What a model reads from the feature store, and how."""

    name: str
    entity_key: str
    features: tuple[Feature, ...]
    version: int = 1
    key_prefix: str = ""
    # Seconds a stored vector stays fresh; 0: no limit. A stale vector counts as missing.
    max_age_s: float = 0.0
    # "default": fill the view's defaults and flag the row; "strict": NOT_FOUND naming the ids.
    missing_entity: str = "default"
    # "unavailable": a failed lookup answers UNAVAILABLE; "defaults": serve defaults, flagged.
    on_store_error: str = "unavailable"
    description: str = ""
    defaults: np.ndarray = field(init=False, repr=False, compare=False)
    _record: np.dtype[Any] = field(init=False, repr=False, compare=False)
    _blank: bytes = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.entity_key:
            raise ValueError("feature view: entity_key is required")
        if not self.features:
            raise ValueError(f"feature view {self.name}: no features")
        names = [f.name for f in self.features]
        if len(set(names)) != len(names):
            raise ValueError(f"feature view {self.name}: duplicate feature names")
        if self.missing_entity not in ("default", "strict"):
            raise ValueError(f"feature view {self.name}: missing_entity must be default or strict")
        if self.on_store_error not in ("unavailable", "defaults"):
            raise ValueError(
                f"feature view {self.name}: on_store_error must be unavailable or defaults"
            )
        if not self.key_prefix:
            object.__setattr__(self, "key_prefix", f"bl:{self.name}:v{self.version}:")
        object.__setattr__(
            self, "defaults", np.array([f.default for f in self.features], dtype=np.float32)
        )
        record = np.dtype([("t", "<f8"), ("v", "<f4", (self.width,))])
        object.__setattr__(self, "_record", record)
        object.__setattr__(self, "_blank", bytes(record.itemsize))

    @property
    def width(self) -> int:
        return len(self.features)

    @property
    def feature_names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.features)

    def key(self, entity: str) -> str:
        return self.key_prefix + entity

    # ---- the stored form ------------------------------------------------------------------

    def pack(self, values: np.ndarray, updated_at: float) -> bytes:
        row = np.ascontiguousarray(values, dtype="<f4")
        if row.shape != (self.width,):
            raise ValueError(
                f"feature view {self.name}: expected {self.width} values, got {row.shape}"
            )
        return _TIME.pack(updated_at) + row.tobytes()

    def unpack(self, blob: bytes) -> tuple[float, np.ndarray] | None:
        """(update time, values) or None when the blob is not this view's layout."""
        if len(blob) != 8 + 4 * self.width:
            return None
        return _TIME.unpack_from(blob)[0], np.frombuffer(blob, dtype="<f4", offset=8)

    # ---- stored vectors -> model input ----------------------------------------------------

    def decode(
        self, blobs: Sequence[bytes | None], now: float
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Stored vectors -> (the model input [N, F] float32, a mask of rows that were missing
        or stale and got the view's defaults, values filled in per row). Vectorised: one join
        and one np.frombuffer for the whole batch."""
        size = 8 + 4 * self.width
        absent = np.zeros(len(blobs), dtype=bool)
        parts: list[bytes] = []
        for i, blob in enumerate(blobs):
            if blob is None or len(blob) != size:
                absent[i] = True
                parts.append(self._blank)
            else:
                parts.append(blob)
        records = np.frombuffer(b"".join(parts), dtype=self._record)
        matrix = records["v"].copy()
        if self.max_age_s:
            absent |= (now - records["t"]) > self.max_age_s  # stale: as good as missing
        if absent.any():
            matrix[absent] = self.defaults
        holes = ~np.isfinite(matrix)  # a stored inf (another writer's) is as good as missing
        if holes.any():
            filled = holes.sum(axis=1)
            matrix = np.where(holes, self.defaults, matrix)
        else:
            filled = np.zeros(len(blobs), dtype=np.int64)
        return matrix, absent, filled

    def to_matrix(
        self, entities: Sequence[str], blobs: Sequence[bytes | None], now: float
    ) -> tuple[np.ndarray, list[int], int]:
        """The model input [N, F] float32 for `entities`, the rows that used a default, and
        how many single values were filled in. Raises NotFound (strict views) naming the ids."""
        if len(blobs) == 1:  # the common request: one entity, found, fresh and complete
            blob = blobs[0]
            if (
                blob is not None
                and len(blob) == self._record.itemsize
                and (not self.max_age_s or now - _TIME.unpack_from(blob)[0] <= self.max_age_s)
            ):
                row = np.frombuffer(blob, dtype="<f4", offset=8).reshape(1, self.width)
                if np.isfinite(row).all():
                    return row, [], 0
        matrix, absent, filled = self.decode(blobs, now)
        if self.missing_entity == "strict" and absent.any():
            raise self.missing_error([entities[int(i)] for i in np.flatnonzero(absent)])
        defaulted = np.flatnonzero(absent | (filled > 0)).tolist()
        return matrix, defaulted, int(filled.sum())

    def missing_error(self, missing: Sequence[str]) -> NotFound:
        shown = ", ".join(missing[:10]) + (" ..." if len(missing) > 10 else "")
        return NotFound(f"unknown {self.entity_key} for feature view {self.name}: {shown}")

    def default_matrix(self, rows: int) -> np.ndarray:
        return np.tile(self.defaults, (rows, 1))

    # ---- offline rows -> stored values ----------------------------------------------------

    def row_values(self, row: Mapping[str, Any]) -> tuple[np.ndarray, int]:
        """Values for one offline row in view order; missing or non-numeric become NaN
        (the same handling serving applies). Returns the values and how many were bad."""
        values = np.empty(self.width, dtype=np.float32)
        bad = 0
        for i, feature in enumerate(self.features):
            raw = row.get(feature.name)
            try:
                value = float(raw) if raw is not None and raw != "" else math.nan
            except (TypeError, ValueError):
                value = math.nan
            # Finite as float64 is not enough: "1e39" overflows float32 to inf. What the model
            # would see (after the cast) must be finite, or the value counts as missing.
            if not math.isfinite(value) or abs(value) > _FLOAT32_MAX:
                bad += 1
                value = math.nan
            values[i] = value
        return values, bad

    # ---- JSON -----------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "entity_key": self.entity_key,
            "features": [{"name": f.name, "default": f.default} for f in self.features],
            "layout": "packed",
            "key_prefix": self.key_prefix,
            "max_age_s": self.max_age_s,
            "missing_entity": self.missing_entity,
            "on_store_error": self.on_store_error,
            "description": self.description,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FeatureView:
        known = {
            "name", "version", "entity_key", "features", "layout", "key_prefix", "max_age_s",
            "missing_entity", "on_store_error", "description",
        }  # fmt: skip
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"feature view: unknown key {sorted(unknown)[0]}")
        if data.get("layout", "packed") != "packed":
            raise ValueError("feature view: only the packed layout is supported")
        return cls(
            name=str(data["name"]),
            version=int(data.get("version", 1)),
            entity_key=str(data["entity_key"]),
            features=tuple(
                Feature(str(f["name"]), float(f.get("default", 0.0))) for f in data["features"]
            ),
            key_prefix=str(data.get("key_prefix", "")),
            max_age_s=float(data.get("max_age_s", 0.0)),
            missing_entity=str(data.get("missing_entity", "default")),
            on_store_error=str(data.get("on_store_error", "unavailable")),
            description=str(data.get("description", "")),
        )

    @classmethod
    def from_json(cls, text: str) -> FeatureView:
        return cls.from_dict(json.loads(text))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)
