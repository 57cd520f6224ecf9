"""batchline's model registry client: resolve `name@alias` to a verified ONNX artifact.

Stdlib only at import time; `registry_client.demo` (training the demo models) needs numpy and
the "train" extra and is imported on its own.
"""

from __future__ import annotations

from registry_client.errors import (
    AliasNotFound,
    AttachmentNotFound,
    ChecksumMismatch,
    InvalidName,
    InvalidReference,
    ManifestError,
    ModelNotFound,
    NothingToRollBack,
    RegistryError,
    RegistryUnavailable,
    VersionNotFound,
)
from registry_client.file_registry import FileRegistry
from registry_client.mlflow_registry import MlflowRegistry
from registry_client.open import open_registry
from registry_client.protocol import Registry
from registry_client.refs import (
    DEFAULT_ALIAS,
    ModelRef,
    parse_ref,
    validate_alias,
    validate_name,
    validate_version,
)
from registry_client.rollback import rollback
from registry_client.types import ModelVersion, Signature, TensorInfo

__all__ = [
    "DEFAULT_ALIAS",
    "AliasNotFound",
    "AttachmentNotFound",
    "ChecksumMismatch",
    "FileRegistry",
    "InvalidName",
    "InvalidReference",
    "ManifestError",
    "MlflowRegistry",
    "ModelNotFound",
    "ModelRef",
    "ModelVersion",
    "NothingToRollBack",
    "Registry",
    "RegistryError",
    "RegistryUnavailable",
    "Signature",
    "TensorInfo",
    "VersionNotFound",
    "open_registry",
    "parse_ref",
    "rollback",
    "validate_alias",
    "validate_name",
    "validate_version",
]
