"""The embedded default registry: a folder of numbered model versions and an alias file."""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import stat
import tempfile
import threading
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from registry_client.errors import (
    AliasNotFound,
    AttachmentNotFound,
    ChecksumMismatch,
    InvalidName,
    ManifestError,
    ModelNotFound,
    RegistryError,
    VersionNotFound,
)
from registry_client.manifest import (
    ARTIFACT,
    METADATA,
    RESERVED,
    DigestCache,
    ExternalDataCache,
    check_attachments,
    check_manifest,
    external_data_files,
    external_sources,
    folder_files,
    manifest_digest,
)
from registry_client.refs import (
    ModelRef,
    parse_ref,
    validate_alias,
    validate_name,
    validate_version,
)
from registry_client.types import ModelVersion, Signature

ALIASES = "aliases.json"
LOCK = ".lock"
_CHUNK = 1 << 20
# 1: only model.onnx's sha256. 2: a manifest of every file in the version folder.
_METADATA_SCHEMA = 2
_LEGACY_SCHEMA = 1
_VERSION_DIR = re.compile(r"[1-9][0-9]{0,17}")
_log = logging.getLogger(__name__)


class FileRegistry:
    """A Registry kept in a local folder, safe for several processes sharing it.

    Layout: ``ROOT/<name>/<version>/model.onnx``, ``ROOT/<name>/<version>/metadata.json``, the
    version's external-data files and attachments beside them, and ``ROOT/<name>/aliases.json``.
    Guarantees:

    * a reader never sees a half-written file or version: files are written to a temp file in the
      same folder, fsynced and renamed over; a new version is staged in a hidden folder and
      renamed into place whole;
    * writers (register, set_alias) on one model are serialised by ``flock`` on
      ``ROOT/<name>/.lock``, so concurrent processes get distinct versions and the alias file
      never loses an update;
    * no name, alias or version can address a path outside ``root``;
    * ``register`` records a manifest (every file of the version -> sha256, and one digest over
      it) in metadata.json; it copies in the external-data files the graph references from
      beside the source model, and refuses a model whose external data is missing or would
      lie outside the version folder;
    * ``fetch`` returns model.onnx's path only after every file in the manifest matches its
      sha256, the folder holds no file the manifest does not list (ONNX Runtime could load it
      as external data), and every external-data file the graph references is in the manifest;
      ``attachment`` returns a path only after that file matches. A verified file's identity
      (device, inode, size, mtime, ctime) is remembered so a reload does not rehash an
      unchanged file;
    * a version registered before manifests existed (metadata schema 1) has model.onnx
      verified; one whose graph references external data is refused, its other files are
      served with a warning (once per version) until ``rehash`` writes a manifest for it.
    """

    def __init__(self, root: Path | str) -> None:
        self._root = Path(root).expanduser().resolve()
        self._digests = DigestCache()
        self._external = ExternalDataCache(self._digests)
        self._warned: set[tuple[str, str]] = set()
        self._lock = threading.Lock()

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
        """The path of a file registered alongside a version (see ``register(attachments=)``),
        after it matched its sha256 in the version's manifest.

        AttachmentNotFound when the version has no such attachment; ChecksumMismatch or
        ManifestError (naming the file) when the file is not what was registered.
        """
        mv = self.get_version(name, version)
        filename = validate_name(filename, what="attachment name")
        folder = Path(mv.artifact).parent
        path = folder / filename
        if not mv.files:  # registered before manifests: nothing to check it against
            if not path.is_file():
                raise AttachmentNotFound(name, version, filename, tuple(_legacy_files(folder)))
            self._warn_unverified(mv, folder, [filename])
            return path
        if filename not in mv.files:
            if os.path.lexists(path):
                raise ManifestError(_unlisted_message(mv, path))
            raise AttachmentNotFound(name, version, filename, _attachments(mv))
        self._verify(mv, path, mv.files[filename])
        return path

    def fetch(self, mv: ModelVersion) -> Path:
        """model.onnx's path, once the whole version folder matches the version's manifest."""
        path = _local_path(mv.artifact)
        if not mv.files:
            return self._fetch_legacy(mv, path)
        folder = path.parent
        check_manifest(
            mv.files,
            sha256=mv.sha256,
            digest=mv.manifest_sha256,
            external_data=mv.external_data,
            where=f"metadata of model {mv.name!r} version {mv.version} ({folder / METADATA})",
        )
        try:
            present = folder_files(folder)
        except FileNotFoundError:
            raise RegistryError(
                f"artifact {path} of model {mv.name!r} version {mv.version} is missing"
            ) from None
        unlisted = [f for f in present if f not in mv.files]
        if unlisted:
            raise ManifestError(_unlisted_message(mv, folder / unlisted[0], len(unlisted)))
        # model.onnx first: a replaced model is reported as that, not as its data.
        for relative in sorted(mv.files, key=lambda f: (f != ARTIFACT, f)):
            self._verify(mv, folder / relative, mv.files[relative])
        for relative in self._external_data(path, mv.sha256):
            if relative not in mv.external_data:
                raise ManifestError(
                    f"model {mv.name!r} version {mv.version}: the graph references external "
                    f"data {folder / relative} that its manifest does not list as external data; "
                    "register the model again"
                )
        return path

    def rehash(self, name: str, version: str) -> ModelVersion:
        """Write a manifest for a version registered before manifests existed (schema 1), from
        the files in its folder now; call it only after checking those files.

        model.onnx must still match the sha256 recorded at registration, every external-data
        file its graph references must be present, and every other file must be a top-level
        plain file (it becomes an attachment). A version that already has a manifest is refused:
        a file that no longer matches it changed after registration, and rehashing would bless
        the change.
        """
        model_dir = self._existing_model_dir(name)
        version = validate_version(version)
        with self._locked(model_dir):
            mv = self.get_version(name, version)
            folder = Path(mv.artifact).parent
            if mv.files:
                raise RegistryError(
                    f"model {name!r} version {version} already has a manifest (recorded when it "
                    "was registered): nothing to rehash. If a file no longer matches it, the "
                    "file changed after registration: restore it, or register the model again"
                )
            model = folder / ARTIFACT
            actual = self._digests.digest(model)
            if actual != mv.sha256:
                raise ChecksumMismatch(
                    str(model),
                    mv.sha256,
                    actual,
                    "rehash trusts model.onnx only while it matches the sha256 recorded at "
                    "registration; register the model again instead",
                )
            present = folder_files(folder)
            external = external_data_files(model)
            for relative in external:
                if relative not in present:
                    raise ManifestError(
                        f"{model} references external data {folder / relative}, which is "
                        "missing: put it back before rehashing"
                    )
            for relative in present:
                if relative != ARTIFACT and relative not in external:
                    validate_name(relative, what=f"attachment {folder / relative}")
            files = {relative: self._digests.digest(folder / relative) for relative in present}
            new = dataclasses.replace(
                mv,
                files=files,
                manifest_sha256=manifest_digest(files),
                external_data=external,
            )
            _write_atomic(folder / METADATA, _metadata_bytes(new, rehashed=_utc_now()))
        _log.warning(
            "rehashed model %r version %s: a manifest of %d files (%s) now vouches for them",
            name,
            version,
            len(files),
            ", ".join(files),
        )
        return new

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
        """Copy the artifact, the external-data files its graph references (from beside it)
        and any attachments (file name -> source path) in as a new version, with a manifest.

        Copying and hashing happen outside the lock; only numbering and the final rename of the
        staged folder are serialised.
        """
        model_dir = self._model_dir(name)
        src = Path(artifact_path)
        if not src.is_file():
            raise RegistryError(f"cannot register model {name!r}: artifact {src} is not a file")
        extra = check_attachments(name, attachments)

        model_dir.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=model_dir, prefix=".staging-"))
        try:
            digest = _copy_hashing(src, staging / ARTIFACT)
            # The external data the registered bytes reference, not what src says by now.
            try:
                external = external_data_files(staging / ARTIFACT, label=str(src))
            except RegistryError as exc:
                raise type(exc)(f"cannot register model {name!r}: {exc}") from None
            files = {ARTIFACT: digest}
            for relative, data in external_sources(name, src, external, extra).items():
                (staging / relative).parent.mkdir(parents=True, exist_ok=True)
                files[relative] = _copy_hashing(data, staging / relative)
            for filename, path in extra.items():
                files[filename] = _copy_hashing(Path(path), staging / filename)
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
                    files=files,
                    manifest_sha256=manifest_digest(files),
                    external_data=external,
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
        metadata = version_dir / METADATA
        data = _read_json(metadata)
        schema = data.get("schema", _LEGACY_SCHEMA)
        if schema not in {_LEGACY_SCHEMA, _METADATA_SCHEMA}:
            raise RegistryError(
                f"{metadata}: metadata schema {schema!r} is not one this batchline reads "
                f"({_LEGACY_SCHEMA} or {_METADATA_SCHEMA}); upgrade batchline"
            )
        if schema == _METADATA_SCHEMA and not data.get("files"):
            raise RegistryError(
                f"malformed metadata {metadata}: schema 2 but no manifest ('files')"
            )
        # The folder is the source of truth for identity; the artifact path is derived from it.
        data.update(name=model_dir.name, version=version, artifact=str(version_dir / ARTIFACT))
        try:
            return ModelVersion.from_dict(data)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise RegistryError(f"malformed metadata {metadata}: {exc!r}") from exc

    def _verify(self, mv: ModelVersion, path: Path, expected: str) -> None:
        """`path` is a plain file (not a link) whose bytes hash to `expected`."""
        try:
            mode = os.lstat(path).st_mode
        except FileNotFoundError:
            raise ManifestError(
                f"file {path} of model {mv.name!r} version {mv.version} is missing: restore it, "
                "or register the model again"
            ) from None
        if not stat.S_ISREG(mode):
            kind = "a symbolic link" if stat.S_ISLNK(mode) else "not a plain file"
            raise ManifestError(
                f"file {path} of model {mv.name!r} version {mv.version} is {kind}: a registry "
                "version holds plain files only; put the registered file back"
            )
        actual = self._digests.digest(path)
        if actual != expected:
            raise ChecksumMismatch(
                str(path),
                expected,
                actual,
                "restore the registered file, or register the model again",
            )

    def _external_data(self, model: Path, sha256: str) -> tuple[str, ...]:
        return self._external.files(model, sha256)

    def _fetch_legacy(self, mv: ModelVersion, path: Path) -> Path:
        """A version registered before manifests: model.onnx is checked; external data cannot be,
        so a graph that references some is refused; other files are served with a warning."""
        try:
            actual = self._digests.digest(path)
        except FileNotFoundError:
            raise RegistryError(
                f"artifact {path} of model {mv.name!r} version {mv.version} is missing"
            ) from None
        if actual != mv.sha256:
            raise ChecksumMismatch(str(path), mv.sha256, actual)
        external = self._external_data(path, mv.sha256)
        if external:
            raise ManifestError(
                f"model {mv.name!r} version {mv.version} was registered before batchline kept "
                f"manifests (metadata schema 1), and its graph references external data "
                f"({', '.join(external)} in {path.parent}) that nothing verifies: check those "
                f"files, then run `batchline registry rehash {mv.name} {mv.version} --registry "
                f"{self._root}` (or register the model again)"
            )
        others = _legacy_files(path.parent)
        if others:
            self._warn_unverified(mv, path.parent, others)
        return path

    def _warn_unverified(self, mv: ModelVersion, folder: Path, files: list[str]) -> None:
        with self._lock:
            if (mv.name, mv.version) in self._warned:
                return
            self._warned.add((mv.name, mv.version))
        _log.warning(
            "model %r version %s was registered before batchline kept manifests (metadata "
            "schema 1): %s in %s are not verified; check them, then run `batchline registry "
            "rehash %s %s --registry %s`",
            mv.name,
            mv.version,
            ", ".join(files),
            folder,
            mv.name,
            mv.version,
            self._root,
        )

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


def _metadata_bytes(mv: ModelVersion, **extra: str) -> bytes:
    data: dict[str, Any] = {**mv.to_dict(), **extra}
    del data["artifact"]  # derived from where the version folder lives
    data["schema"] = _METADATA_SCHEMA
    return json.dumps(data, indent=2, sort_keys=True).encode() + b"\n"


def _legacy_files(folder: Path) -> list[str]:
    """The names beside model.onnx and metadata.json in a folder (sorted; [] if it is gone)."""
    try:
        return sorted(p.name for p in folder.iterdir() if p.name not in RESERVED)
    except FileNotFoundError:
        return []


def _attachments(mv: ModelVersion) -> tuple[str, ...]:
    return tuple(sorted(f for f in mv.files if f != ARTIFACT and f not in mv.external_data))


def _unlisted_message(mv: ModelVersion, path: Path, count: int = 1) -> str:
    more = f" (and {count - 1} more)" if count > 1 else ""
    return (
        f"model {mv.name!r} version {mv.version}: {path}{more} is not in the version's "
        "manifest: the registry did not put it there, and ONNX Runtime could load it as external "
        "data; remove it (if it belongs to the version, register the model again with it)"
    )


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
