"""batchline's model registry client: resolve `name@alias` to a verified ONNX artifact.

Stdlib only at import time; `registry_client.demo` (training the demo models) needs numpy and
the "train" extra and is imported on its own.
"""

from __future__ import annotations

from registry_client.errors import (
    AliasNotFound,
    ChecksumMismatch,
    InvalidName,
    InvalidReference,
    ModelNotFound,
    RegistryError,
    VersionNotFound,
)
from registry_client.file_registry import FileRegistry
from registry_client.protocol import Registry
from registry_client.refs import (
    DEFAULT_ALIAS,
    ModelRef,
    parse_ref,
    validate_alias,
    validate_name,
    validate_version,
)
from registry_client.types import ModelVersion, Signature, TensorInfo

__all__ = [
    "DEFAULT_ALIAS",
    "AliasNotFound",
    "ChecksumMismatch",
    "FileRegistry",
    "InvalidName",
    "InvalidReference",
    "ModelNotFound",
    "ModelRef",
    "ModelVersion",
    "Registry",
    "RegistryError",
    "Signature",
    "TensorInfo",
    "VersionNotFound",
    "parse_ref",
    "validate_alias",
    "validate_name",
    "validate_version",
]
