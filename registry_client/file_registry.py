"""The embedded default registry: a folder of numbered model versions and an alias file."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from registry_client.errors import (
    AliasNotFound,
    ChecksumMismatch,
    InvalidName,
    ModelNotFound,
    RegistryError,
    VersionNotFound,
)
from registry_client.refs import (
    ModelRef,
    parse_ref,
    validate_alias,
    validate_name,
    validate_version,
)
from registry_client.types import ModelVersion, Signature

ARTIFACT = "model.onnx"
METADATA = "metadata.json"
ALIASES = "aliases.json"
LOCK = ".lock"
_RESERVED = frozenset({ARTIFACT, METADATA})
_CHUNK = 1 << 20
_METADATA_SCHEMA = 1
_VERSION_DIR = re.compile(r"[1-9][0-9]{0,17}")


class FileRegistry:
    """A Registry kept in a local folder, safe for several processes sharing it.

    Layout: ``ROOT/<name>/<version>/model.onnx``, ``ROOT/<name>/<version>/metadata.json`` and
    ``ROOT/<name>/aliases.json``. Guarantees:

    * a reader never sees a half-written file or version: files are written to a temp file in the
      same folder, fsynced and renamed over; a new version is staged in a hidden folder and
      renamed into place whole;
    * writers (register, set_alias) on one model are serialised by ``flock`` on
      ``ROOT/<name>/.lock``, so concurrent processes get distinct versions and the alias file
      never loses an update;
    * no name, alias or version can address a path outside ``root``;
    * ``fetch`` returns a path only after its sha256 matches; a verified (path, inode, size,
      mtime) is remembered so repeated fetches of an unchanged file don't rehash it.
    """

    def __init__(self, root: Path | str) -> None:
        self._root = Path(root).expanduser().resolve()
        self._verified: dict[tuple[str, int, int, int], str] = {}
        self._verified_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"FileRegistry({str(self._root)!r})"

    @property
    def root(self) -> Path:
        return self._root

    # -- reads -------------------------------------------------------------------------------

    def list_models(self) -> list[str]:
        if not self._root.is_dir():
            return []
        names = []
        for entry in self._root.iterdir():
            try:
                validate_name(entry.name)
            except InvalidName:
                continue
            if entry.is_dir() and self._version_numbers(entry):
                names.append(entry.name)
        return sorted(names)

    def list_versions(self, name: str) -> list[ModelVersion]:
        model_dir = self._existing_model_dir(name)
        return [self._read_version(model_dir, str(n)) for n in self._version_numbers(model_dir)]

    def get_version(self, name: str, version: str) -> ModelVersion:
        model_dir = self._existing_model_dir(name)
        version = validate_version(version)
        if not (model_dir / version / METADATA).is_file():
            raise VersionNotFound(name, version, self._known_versions(model_dir))
        return self._read_version(model_dir, version)

    def resolve(self, ref: str | ModelRef) -> ModelVersion:
        parsed = parse_ref(ref) if isinstance(ref, str) else ref
        if parsed.version is not None:
            return self.get_version(parsed.name, parsed.version)
        assert parsed.alias is not None
        current = self.aliases(parsed.name)
        try:
            version = current[parsed.alias]
        except KeyError:
            raise AliasNotFound(parsed.name, parsed.alias, tuple(sorted(current))) from None
        return self.get_version(parsed.name, version)

    def aliases(self, name: str) -> dict[str, str]:
        doc = self._read_aliases(self._existing_model_dir(name))
        return dict(doc["aliases"])

    def alias_history(self, name: str, alias: str) -> list[tuple[str, str]]:
        alias = validate_alias(alias)
        doc = self._read_aliases(self._existing_model_dir(name))
        history = [(h["version"], h["at"]) for h in doc["history"] if h["alias"] == alias]
        if not history and alias not in doc["aliases"]:
            raise AliasNotFound(name, alias, tuple(sorted(doc["aliases"])))
        return history

    def attachment(self, name: str, version: str, filename: str) -> Path:
        """The path of a file registered alongside a version (see ``register(attachments=)``)."""
        mv = self.get_version(name, version)
        path = Path(mv.artifact).parent / validate_name(filename, what="attachment name")
        if not path.is_file():
            raise RegistryError(f"model {name!r} version {version} has no attachment {path}")
        return path

    def fetch(self, mv: ModelVersion) -> Path:
        path = _local_path(mv.artifact)
        try:
            before = path.stat()
        except FileNotFoundError:
            raise RegistryError(
                f"artifact {path} of model {mv.name!r} version {mv.version} is missing"
            ) from None
        key = (str(path), before.st_ino, before.st_size, before.st_mtime_ns)
        with self._verified_lock:
            actual = self._verified.get(key)
        if actual is None:
            actual = _sha256_file(path)
            after = path.stat()
            # Remember the digest only if the file did not change while it was being hashed.
            if (after.st_ino, after.st_size, after.st_mtime_ns) == key[1:]:
                with self._verified_lock:
                    self._verified[key] = actual
        if actual != mv.sha256:
            raise ChecksumMismatch(str(path), mv.sha256, actual)
        return path

    # -- writes ------------------------------------------------------------------------------

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
        """Copy the artifact (and any attachments: file name -> source path) in as a new version.

        Copying and hashing happen outside the lock; only numbering and the final rename of the
        staged folder are serialised.
        """
        model_dir = self._model_dir(name)
        src = Path(artifact_path)
        if not src.is_file():
            raise RegistryError(f"cannot register model {name!r}: artifact {src} is not a file")
        extra = dict(attachments or {})
        for filename, path in extra.items():
            validate_name(filename, what="attachment name")
            if filename in _RESERVED:
                raise InvalidName(filename, "attachment name is reserved by the registry")
            if not Path(path).is_file():
                raise RegistryError(
                    f"cannot register model {name!r}: attachment {path} is not a file"
                )

        model_dir.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=model_dir, prefix=".staging-"))
        try:
            digest = _copy_hashing(src, staging / ARTIFACT)
            for filename, path in extra.items():
                _copy_hashing(Path(path), staging / filename)
            with self._locked(model_dir):
                version = str(max(self._version_numbers(model_dir), default=0) + 1)
                final = model_dir / version
                mv = ModelVersion(
                    name=name,
                    version=version,
                    artifact=str(final / ARTIFACT),
                    sha256=digest,
                    signature=signature,
                    metrics={str(k): float(v) for k, v in (metrics or {}).items()},
                    created=_utc_now(),
                    source=source,
                    tags={str(k): str(v) for k, v in (tags or {}).items()},
                    features=tuple(features),
                    description=description,
                )
                _write_atomic(staging / METADATA, _metadata_bytes(mv))
                os.chmod(staging, 0o755)
                os.rename(staging, final)
                _fsync_dir(model_dir)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return mv

    def set_alias(self, name: str, alias: str, version: str) -> None:
        """Point `alias` at `version`; a move is appended to the history, a no-op set is not."""
        alias = validate_alias(alias)
        version = validate_version(version)
        model_dir = self._existing_model_dir(name)
        with self._locked(model_dir):
            if not (model_dir / version / METADATA).is_file():
                raise VersionNotFound(name, version, self._known_versions(model_dir))
            doc = self._read_aliases(model_dir)
            if doc["aliases"].get(alias) == version:
                return
            doc["aliases"][alias] = version
            doc["history"].append({"alias": alias, "version": version, "at": _utc_now()})
            payload = json.dumps(doc, indent=2, sort_keys=True).encode() + b"\n"
            _write_atomic(model_dir / ALIASES, payload)

    # -- internals ---------------------------------------------------------------------------

    def _model_dir(self, name: str) -> Path:
        validate_name(name)
        path = self._root / name
        # The name rules already forbid separators; this catches a symlink planted in the root.
        if path.resolve().parent != self._root:
            raise InvalidName(name, f"resolves outside the registry root {self._root}")
        return path

    def _existing_model_dir(self, name: str) -> Path:
        path = self._model_dir(name)
        if not path.is_dir():
            raise ModelNotFound(name)
        return path

    @staticmethod
    def _version_numbers(model_dir: Path) -> list[int]:
        numbers = []
        for entry in model_dir.iterdir():
            if _VERSION_DIR.fullmatch(entry.name) and (entry / METADATA).is_file():
                numbers.append(int(entry.name))
        return sorted(numbers)

    def _known_versions(self, model_dir: Path) -> tuple[str, ...]:
        return tuple(str(n) for n in self._version_numbers(model_dir))

    def _read_version(self, model_dir: Path, version: str) -> ModelVersion:
        version_dir = model_dir / version
        if version_dir.resolve().parent != model_dir.resolve():
            raise InvalidName(version, f"version folder {version_dir} resolves outside its model")
        data = _read_json(version_dir / METADATA)
        # The folder is the source of truth for identity; the artifact path is derived from it.
        data.update(name=model_dir.name, version=version, artifact=str(version_dir / ARTIFACT))
        try:
            return ModelVersion.from_dict(data)
        except (KeyError, TypeError, ValueError) as exc:
            raise RegistryError(f"malformed metadata {version_dir / METADATA}: {exc!r}") from exc

    @staticmethod
    def _read_aliases(model_dir: Path) -> dict[str, Any]:
        path = model_dir / ALIASES
        if not path.exists():
            return {"aliases": {}, "history": []}
        doc = _read_json(path)
        if not isinstance(doc.get("aliases"), dict) or not isinstance(doc.get("history"), list):
            raise RegistryError(f"malformed alias file {path}: needs 'aliases' and 'history'")
        return doc

    @contextlib.contextmanager
    def _locked(self, model_dir: Path) -> Iterator[None]:
        fd = os.open(model_dir / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing the descriptor releases the flock


def _utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _metadata_bytes(mv: ModelVersion) -> bytes:
    data = mv.to_dict()
    del data["artifact"]  # derived from where the version folder lives
    data["schema"] = _METADATA_SCHEMA
    return json.dumps(data, indent=2, sort_keys=True).encode() + b"\n"


def _read_json(path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise RegistryError(f"missing registry file {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RegistryError(f"corrupt registry file {path}: {exc}") from exc
    if not isinstance(doc, dict):
        raise RegistryError(f"corrupt registry file {path}: expected a JSON object")
    return doc


def _local_path(artifact: str) -> Path:
    if "://" not in artifact:
        return Path(artifact)
    parts = urlsplit(artifact)
    if parts.scheme != "file" or parts.netloc not in {"", "localhost"}:
        raise RegistryError(f"cannot fetch {artifact}: FileRegistry reads only local files")
    return Path(unquote(parts.path))


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    with path.open("rb", buffering=0) as f:
        while n := f.readinto(buf):
            digest.update(view[:n])
    return digest.hexdigest()


def _copy_hashing(src: Path, dst: Path) -> str:
    digest = hashlib.sha256()
    with src.open("rb") as fin, dst.open("xb") as fout:
        while chunk := fin.read(_CHUNK):
            digest.update(chunk)
            fout.write(chunk)
        fout.flush()
        os.fsync(fout.fileno())
    return digest.hexdigest()


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o644)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
