"""Registry values: a model version, its tensor signature, and their JSON forms."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from registry_client.datatypes import V2_NAMES

# KServe V2 (Open Inference Protocol) datatype names.
V2_DATATYPES = V2_NAMES


@dataclass(frozen=True, slots=True)
class TensorInfo:
    """One model input or output: a V2 datatype name and a shape where -1 marks a variable dim."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    def __post_init__(self) -> None:
        if self.datatype not in V2_DATATYPES:
            raise ValueError(f"tensor {self.name!r}: unknown V2 datatype {self.datatype!r}")
        if any(d < -1 for d in self.shape):
            raise ValueError(f"tensor {self.name!r}: bad shape {self.shape} (dims are >= -1)")

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TensorInfo:
        return cls(
            name=str(data["name"]),
            datatype=str(data["datatype"]),
            shape=tuple(int(d) for d in data["shape"]),
        )


@dataclass(frozen=True, slots=True)
class Signature:
    """A model's inputs and outputs, in the order the model declares them."""

    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "inputs": [t.to_dict() for t in self.inputs],
            "outputs": [t.to_dict() for t in self.outputs],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Signature:
        return cls(
            inputs=tuple(TensorInfo.from_dict(t) for t in data["inputs"]),
            outputs=tuple(TensorInfo.from_dict(t) for t in data["outputs"]),
        )


@dataclass(frozen=True, slots=True)
class ModelVersion:
    """One immutable registered version of a model.

    `artifact` locates model.onnx (an absolute local path or a URI); `sha256` is the hex digest
    of its bytes, recorded at registration and checked by `Registry.fetch`. `files` is the
    version's manifest: every file of the version (model.onnx, the external-data files its
    graph references, listed again in `external_data`, and each attachment) by its path
    relative to model.onnx's folder -> hex sha256; `manifest_sha256` is one digest over it (see
    ``registry_client.manifest``). Both are empty for a version registered before manifests
    existed, whose other files nothing verifies. `features` is the ordered list of input
    feature names (may be empty). Versions are positive integers as strings. The dict fields
    take no part in hashing, so a ModelVersion can still key a dict or a set.
    """

    name: str
    version: str
    artifact: str
    sha256: str
    signature: Signature
    metrics: dict[str, float] = field(hash=False)
    created: str
    source: str
    tags: dict[str, str] = field(hash=False)
    features: tuple[str, ...]
    description: str = ""
    files: dict[str, str] = field(default_factory=dict, hash=False)
    manifest_sha256: str = ""
    external_data: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "artifact": self.artifact,
            "sha256": self.sha256,
            "signature": self.signature.to_dict(),
            "metrics": dict(self.metrics),
            "created": self.created,
            "source": self.source,
            "tags": dict(self.tags),
            "features": list(self.features),
            "description": self.description,
            "files": dict(sorted(self.files.items())),
            "manifest_sha256": self.manifest_sha256,
            "external_data": list(self.external_data),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelVersion:
        return cls(
            name=str(data["name"]),
            version=str(data["version"]),
            artifact=str(data["artifact"]),
            sha256=str(data["sha256"]),
            signature=Signature.from_dict(data["signature"]),
            metrics={str(k): float(v) for k, v in data.get("metrics", {}).items()},
            created=str(data["created"]),
            source=str(data.get("source", "")),
            tags={str(k): str(v) for k, v in data.get("tags", {}).items()},
            features=tuple(str(f) for f in data.get("features", ())),
            description=str(data.get("description", "")),
            files={str(k): str(v) for k, v in data.get("files", {}).items()},
            manifest_sha256=str(data.get("manifest_sha256", "")),
            external_data=tuple(str(f) for f in data.get("external_data", ())),
        )
