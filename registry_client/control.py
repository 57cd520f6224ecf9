"""Control state kept in the registry beside the aliases: what a deployment serves for a model.

Aliases say which version is "production"; control state says what one *deployment* of the
server does with a model right now: a pinned ref (``ReloadModel(ref=churn@2)``) and the route
(canary and shadow versions). Every worker process and every replica of a deployment reads the
same record, so an admin call made on one connection is what every connection sees.

One record per (model, deployment), with a generation number that grows by one on every write.
Workers apply records in generation order; a worker that has applied generation G is current
for everything written up to G.

Backends:

* FileRegistry: ``ROOT/<name>/control.json``, ``{"deployments": {"<deployment>": {...}}}``,
  written under the model's flock (the same lock ``set_alias`` takes) by write-temp-fsync-
  rename, so readers never see half a record and concurrent writers never lose a generation.
* MlflowRegistry: the registered-model tag ``batchline.control.<deployment>`` (JSON). MLflow has
  no compare-and-set: two writers at the same instant may both write generation G+1; the later
  write wins and both workers converge on it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from registry_client.errors import RegistryError
from registry_client.refs import validate_name

CONTROL = "control.json"
CONTROL_TAG = "batchline.control."
_UNSET: Any = object()


@dataclass(frozen=True)
class ControlState:
    """One deployment's control record for one model.

    `ref`: the ref the deployment serves ("" = the ref in its configuration).
    `route`: canary and shadows, ``{"canary", "canary_percent", "shadows": [{version,
    sample_percent}]}``, or None for "as configured". The primary is never stored: it is always
    the version `ref` resolves to.
    """

    generation: int = 0
    ref: str = ""
    route: dict[str, Any] | None = None
    updated: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "generation": self.generation,
            "ref": self.ref,
            "route": self.route,
            "updated": self.updated,
            **self.extra,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str) -> ControlState:
        try:
            generation = int(data.get("generation", 0))
            ref = str(data.get("ref", "") or "")
            route = data.get("route")
            if route is not None and not isinstance(route, dict):
                raise ValueError("route: expected a table or null")
        except (TypeError, ValueError) as exc:
            raise RegistryError(f"malformed control state in {where}: {exc}") from exc
        known = {"generation", "ref", "route", "updated"}
        return cls(
            generation=generation,
            ref=ref,
            route=route,
            updated=str(data.get("updated", "")),
            extra={k: v for k, v in data.items() if k not in known},
        )


class ControlStore(Protocol):
    def read(self, name: str) -> ControlState:
        """The record for `name` (generation 0 when none was ever written)."""
        ...

    def update(
        self, name: str, *, ref: str = ..., route: dict[str, Any] | None = ...
    ) -> ControlState:
        """Write the fields given (others kept), generation + 1; return the new record."""
        ...

    def change_token(self, name: str) -> object:
        """Something cheap that changes whenever the record may have changed (None: unknown,
        read the record)."""
        ...


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _next(current: ControlState, ref: Any, route: Any) -> ControlState:
    return ControlState(
        generation=current.generation + 1,
        ref=current.ref if ref is _UNSET else ref,
        route=current.route if route is _UNSET else route,
        updated=_now(),
        extra=current.extra,
    )


class FileControlStore:
    """Control records of one deployment in a FileRegistry's folder."""

    def __init__(self, registry: Any, deployment: str) -> None:
        self._registry = registry
        self._root = Path(registry.root)
        self.deployment = validate_name(deployment, what="deployment name")

    def _path(self, name: str) -> Path:
        validate_name(name)
        return self._root / name / CONTROL

    def _read_doc(self, path: Path) -> dict[str, Any]:
        try:
            doc = json.loads(path.read_bytes())
        except FileNotFoundError:
            return {"deployments": {}}
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise RegistryError(f"corrupt control file {path}: {exc}") from exc
        if not isinstance(doc, dict) or not isinstance(doc.get("deployments"), dict):
            raise RegistryError(f"malformed control file {path}: needs a 'deployments' table")
        return doc

    def read(self, name: str) -> ControlState:
        path = self._path(name)
        record = self._read_doc(path)["deployments"].get(self.deployment)
        if record is None:
            return ControlState()
        if not isinstance(record, dict):
            raise RegistryError(f"malformed control file {path}: {self.deployment!r}")
        return ControlState.from_dict(record, str(path))

    def update(self, name: str, *, ref: Any = _UNSET, route: Any = _UNSET) -> ControlState:
        path = self._path(name)
        model_dir = path.parent
        if not model_dir.is_dir():
            raise RegistryError(f"model {name!r} is not in the registry at {self._root}")
        from registry_client.file_registry import _write_atomic

        with self._registry._locked(model_dir):
            doc = self._read_doc(path)
            record = doc["deployments"].get(self.deployment)
            current = (
                ControlState.from_dict(record, str(path))
                if isinstance(record, dict)
                else ControlState()
            )
            state = _next(current, ref, route)
            doc["deployments"][self.deployment] = state.to_dict()
            _write_atomic(path, json.dumps(doc, indent=2, sort_keys=True).encode() + b"\n")
        return state

    def change_token(self, name: str) -> object:
        try:
            st = os.stat(self._path(name))
        except FileNotFoundError:
            return 0
        return (st.st_ino, st.st_mtime_ns, st.st_size)


class MlflowControlStore:
    """Control records of one deployment as MLflow registered-model tags."""

    def __init__(self, registry: Any, deployment: str) -> None:
        self._registry = registry
        self.deployment = validate_name(deployment, what="deployment name")
        self._tag = CONTROL_TAG + self.deployment

    def read(self, name: str) -> ControlState:
        model = self._registry._registered_model(validate_name(name))
        raw = next(
            (t.get("value", "") for t in model.get("tags", []) if t.get("key") == self._tag), ""
        )
        if not raw:
            return ControlState()
        try:
            data = json.loads(raw)
        except ValueError as exc:
            raise RegistryError(f"model {name!r}: malformed tag {self._tag}: {exc}") from exc
        if not isinstance(data, dict):
            raise RegistryError(f"model {name!r}: malformed tag {self._tag}: not a table")
        return ControlState.from_dict(data, f"tag {self._tag} of {name!r}")

    def update(self, name: str, *, ref: Any = _UNSET, route: Any = _UNSET) -> ControlState:
        from registry_client.mlflow_registry import API

        state = _next(self.read(name), ref, route)
        self._registry._http.post(
            f"{API}/registered-models/set-tag",
            {"name": name, "key": self._tag, "value": json.dumps(state.to_dict())},
            idempotent=True,
        )
        return state

    def change_token(self, name: str) -> object:
        return None


def open_control_store(registry: Any, deployment: str) -> ControlStore | None:
    """The control store of `registry`'s backend, or None if it has none (state stays local)."""
    from registry_client.file_registry import FileRegistry
    from registry_client.mlflow_registry import MlflowRegistry

    if isinstance(registry, FileRegistry):
        return FileControlStore(registry, deployment)
    if isinstance(registry, MlflowRegistry):
        return MlflowControlStore(registry, deployment)
    return None
