"""The Registry protocol: what the server needs from any model registry backend."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Protocol, runtime_checkable

from registry_client.refs import ModelRef
from registry_client.types import ModelVersion, Signature


@runtime_checkable
class Registry(Protocol):
    """A store of immutable, numbered model versions and movable aliases pointing at them.

    Implementations guarantee: versions are assigned 1, 2, 3, ... per model and never reused;
    `fetch` returns a local path only after every file of the version (model.onnx, the external
    data its graph references, its attachments) matches the version's manifest, and
    `attachment` only after that file does; lookups of an unknown model, version, alias or
    attachment raise ModelNotFound / VersionNotFound / AliasNotFound / AttachmentNotFound.
    """

    def list_models(self) -> list[str]:
        """Registered model names, sorted."""
        ...

    def list_versions(self, name: str) -> list[ModelVersion]:
        """Every version of `name`, oldest (lowest number) first."""
        ...

    def get_version(self, name: str, version: str) -> ModelVersion: ...

    def resolve(self, ref: str | ModelRef) -> ModelVersion:
        """`name`, `name@alias` or `name@<version>` to the version it names now."""
        ...

    def fetch(self, mv: ModelVersion) -> Path:
        """A local path to model.onnx, its version verified (ChecksumMismatch, ManifestError)."""
        ...

    def attachment(self, name: str, version: str, filename: str) -> Path:
        """A local path to a file registered with the version, verified against its manifest."""
        ...

    def register(
        self,
        name: str,
        artifact_path: Path,
        *,
        signature: Signature,
        metrics: Mapping[str, float] | None = None,
        tags: Mapping[str, str] | None = None,
        features: tuple[str, ...] = (),
        source: str = "",
        description: str = "",
        attachments: Mapping[str, Path] | None = None,
    ) -> ModelVersion:
        """Copy the artifact, its external data and `attachments` (file name -> source) in,
        record their manifest and return it as the next version."""
        ...

    def set_alias(self, name: str, alias: str, version: str) -> None:
        """Point `alias` at an existing `version` (VersionNotFound otherwise); history is kept."""
        ...

    def aliases(self, name: str) -> dict[str, str]:
        """Alias -> version for `name`."""
        ...

    def alias_history(self, name: str, alias: str) -> list[tuple[str, str]]:
        """(version, ISO-8601 UTC time) for every time `alias` was set, oldest first."""
        ...
