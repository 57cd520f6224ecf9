"""Routing: which version answers a request (canary split) and which versions see a copy (shadows).

The split is a pure function of a sticky key (the entity id when the request has one, else the
request id): ``canary_bucket`` hashes the key with BLAKE2b to a number in [0, 100), and a request
goes to the canary when its bucket is below ``canary_percent``. Consequences worth knowing:

- the same key always gets the same version, in every process and after every restart (Python's
  ``hash()`` is salted per process, so it is never used here);
- raising the share only adds keys to the canary (a key on the canary at 5 % stays there at 10 %);
- shadow sampling hashes the same key with a different BLAKE2b personalisation, so whether a
  request is mirrored is independent of whether it went to the canary; all shadows share that one
  sampling hash, so a shadow at 10 % sees a subset of what a shadow at 50 % sees.

The mirrored work itself runs in ``server.shadow.mirror.ShadowMirror``.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

PRIMARY = "primary"
CANARY = "canary"

_CANARY_PERSON = b"batchline-canary"
_SHADOW_PERSON = b"batchline-shadow"
# 53 bits: the most an IEEE double holds exactly, so the bucket is uniform and strictly < 100.
_BUCKET_BITS = 53


def _bucket(key: str, person: bytes) -> float:
    digest = hashlib.blake2b(key.encode("utf-8"), digest_size=8, person=person).digest()
    value = int.from_bytes(digest, "big") >> (64 - _BUCKET_BITS)
    return value / float(1 << _BUCKET_BITS) * 100.0


def canary_bucket(key: str) -> float:
    """The key's place in [0, 100) for the canary split: stable across processes and releases."""
    return _bucket(key, _CANARY_PERSON)


def shadow_bucket(key: str) -> float:
    """The key's place in [0, 100) for shadow sampling, independent of ``canary_bucket``."""
    return _bucket(key, _SHADOW_PERSON)


def _percent(field_name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{field_name}: expected a number in 0..100, got {value!r}")
    number = float(value)
    if not (math.isfinite(number) and 0.0 <= number <= 100.0):
        raise ValueError(f"{field_name}: expected a number in 0..100, got {value!r}")
    return number


def _version(field_name: str, value: object) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{field_name}: expected a non-empty version string, got {value!r}")
    return value


@dataclass(frozen=True, slots=True)
class ShadowSpec:
    """A version that receives a mirrored copy of `sample_percent` % of a model's requests."""

    version: str
    sample_percent: float = 100.0

    def __post_init__(self) -> None:
        _version("shadows.version", self.version)
        object.__setattr__(
            self, "sample_percent", _percent("shadows.sample_percent", self.sample_percent)
        )

    def to_dict(self) -> dict[str, Any]:
        return {"version": self.version, "sample_percent": self.sample_percent}

    @classmethod
    def from_dict(cls, data: object) -> ShadowSpec:
        """A mapping ``{version, sample_percent?}``, or a bare version string (100 %)."""
        if isinstance(data, str):
            return cls(data)
        if not isinstance(data, Mapping):
            raise ValueError(f"shadows: expected a version or a table, got {data!r}")
        unknown = set(data) - {"version", "sample_percent"}
        if unknown:
            raise ValueError(f"shadows.{sorted(unknown)[0]}: unknown key")
        if "version" not in data:
            raise ValueError("shadows.version: missing")
        return cls(data["version"], data.get("sample_percent", 100.0))


@dataclass(frozen=True, slots=True)
class Route:
    """Where one model's requests go: `primary` answers, `canary` answers `canary_percent` % of
    sticky keys instead, and every shadow gets a copy it may not answer with.

    Invariants (checked; ValueError names the field): versions are non-empty; a canary differs
    from the primary; a share without a canary is 0; a shadow is neither the primary nor the
    canary, and each shadow version appears once.
    """

    model: str
    primary: str
    canary: str | None = None
    canary_percent: float = 0.0
    shadows: tuple[ShadowSpec, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model:
            raise ValueError(f"model: expected a non-empty model name, got {self.model!r}")
        _version("primary", self.primary)
        object.__setattr__(self, "canary_percent", _percent("canary_percent", self.canary_percent))
        if self.canary is None:
            if self.canary_percent != 0.0:
                raise ValueError(
                    f"canary_percent: {self.canary_percent:g} % needs a canary version"
                )
        else:
            _version("canary", self.canary)
            if self.canary == self.primary:
                raise ValueError(f"canary: version {self.canary} is already the primary")
        if not isinstance(self.shadows, tuple):
            object.__setattr__(self, "shadows", tuple(self.shadows))
        seen: set[str] = set()
        for spec in self.shadows:
            if not isinstance(spec, ShadowSpec):
                raise ValueError(f"shadows: expected ShadowSpec entries, got {spec!r}")
            if spec.version in (self.primary, self.canary):
                role = PRIMARY if spec.version == self.primary else CANARY
                raise ValueError(f"shadows: version {spec.version} is already the {role}")
            if spec.version in seen:
                raise ValueError(f"shadows: version {spec.version} is listed twice")
            seen.add(spec.version)

    @property
    def versions(self) -> tuple[str, ...]:
        """Every version this route needs loaded: primary, canary, shadows."""
        canary = (self.canary,) if self.canary is not None else ()
        return (self.primary, *canary, *(s.version for s in self.shadows))

    def with_primary(self, version: str) -> Route:
        """This route after the primary moved to `version` (an alias reload or a promotion):
        a canary or shadow that is now the primary stops being one."""
        if self.canary == version:
            canary, percent = None, 0.0
        else:
            canary, percent = self.canary, self.canary_percent
        shadows = tuple(s for s in self.shadows if s.version != version)
        return Route(self.model, version, canary, percent, shadows)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "primary": self.primary,
            "canary": self.canary,
            "canary_percent": self.canary_percent,
            "shadows": [s.to_dict() for s in self.shadows],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Route:
        """The inverse of `to_dict`; `canary` may be absent or empty, `shadows` may list bare
        version strings. Unknown keys are refused."""
        unknown = set(data) - {"model", "primary", "canary", "canary_percent", "shadows"}
        if unknown:
            raise ValueError(f"{sorted(unknown)[0]}: unknown key")
        for required in ("model", "primary"):
            if required not in data:
                raise ValueError(f"{required}: missing")
        shadows = data.get("shadows", ())
        if isinstance(shadows, str | bytes) or not isinstance(shadows, list | tuple):
            raise ValueError(f"shadows: expected a list, got {shadows!r}")
        return cls(
            model=data["model"],
            primary=data["primary"],
            canary=data.get("canary") or None,
            canary_percent=data.get("canary_percent", 0.0),
            shadows=tuple(ShadowSpec.from_dict(s) for s in shadows),
        )


def choose_version(
    route: Route, sticky_key: str, *, rng: Callable[[], float] = random.random
) -> tuple[str, str]:
    """(version, role) for one request: role is "primary" or "canary".

    `sticky_key` is the entity id when the request has one, else its request id. An empty key
    has nothing to stick to, so it draws at random (`rng`, uniform in [0, 1)): anonymous traffic
    still splits in the configured proportion.
    """
    share = route.canary_percent
    if route.canary is None or share <= 0.0:
        return route.primary, PRIMARY
    if share >= 100.0:
        return route.canary, CANARY
    bucket = canary_bucket(sticky_key) if sticky_key else rng() * 100.0
    if bucket < share:
        return route.canary, CANARY
    return route.primary, PRIMARY


def should_mirror(spec: ShadowSpec, key: str, *, rng: Callable[[], float] = random.random) -> bool:
    """Whether the request with this sticky key is mirrored to `spec.version`.

    Pure for a non-empty key (same key, same answer); an empty key draws at random.
    """
    if spec.sample_percent >= 100.0:
        return True
    if spec.sample_percent <= 0.0:
        return False
    bucket = shadow_bucket(key) if key else rng() * 100.0
    return bucket < spec.sample_percent


def mirror_targets(route: Route, key: str) -> tuple[ShadowSpec, ...]:
    """The shadows this request is mirrored to (in route order)."""
    return tuple(s for s in route.shadows if should_mirror(s, key))


__all__ = [
    "CANARY",
    "PRIMARY",
    "Route",
    "ShadowSpec",
    "canary_bucket",
    "choose_version",
    "mirror_targets",
    "shadow_bucket",
    "should_mirror",
]
