"""MlflowRegistry: the Registry protocol over an MLflow tracking server's REST API.

The REST calls go through ``registry_client.http`` (httpx); the ``mlflow`` package is needed by
the tests (to run a server), never by the inference server.

How batchline's registry maps onto MLflow:

* a model is an MLflow *registered model*; a version is a *model version* (MLflow numbers them
  1, 2, 3, ... per model, as the Registry protocol requires);
* ``register`` creates a run in the experiment ``batchline-registry`` (whose artifact location
  is the server's artifact proxy, ``mlflow-artifacts:/batchline-registry``, so uploads work
  whether the server was started with ``--artifacts-destination`` or ``--default-artifact-root``,
  as long as it serves artifacts, the default), uploads ``model.onnx``, the external-data files
  its graph references and any attachments into the run's ``model/`` folder through
  ``PUT /api/2.0/mlflow-artifacts/artifacts/...``, logs the metrics on the run and creates the
  model version with that folder as its source;
* batchline's metadata lives in model-version tags: ``sha256`` (hex digest of model.onnx),
  ``batchline.files`` (the manifest: every uploaded file, relative to ``model/`` -> sha256, JSON),
  ``batchline.manifest_sha256`` (one digest over it), ``batchline.external_data`` (JSON list),
  ``batchline.signature``, ``batchline.metrics``, ``batchline.features`` (JSON) and
  ``batchline.source``; any other tag not starting with ``mlflow.`` is a user tag. A version
  with only a ``sha256`` tag (registered outside batchline, or before manifests) is served as
  the one file model.onnx, and refused if its graph references external data;
* aliases are MLflow aliases (case-sensitive there; batchline writes them lower case). MLflow
  keeps no alias history, so ``set_alias`` records it in the registered-model tag
  ``batchline.alias_history.<alias>``: a JSON list of ``{"version": "3", "at": ISO-8601}``,
  oldest first, the last 100 moves. A move made outside batchline (the MLflow UI, say) shows up
  as an entry with ``"at": ""`` the next time the history is read or written. MLflow has no
  compare-and-set, so two writers moving one alias at the same instant may lose a history entry
  (never the alias itself);
* ``name@production`` / ``name@staging``: the alias if set, else the latest version in the
  deprecated MLflow stage ``Production`` / ``Staging``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import posixpath
import re
import shutil
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

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
from registry_client.http import (
    DEFAULT_RETRIES,
    DEFAULT_TIMEOUT_S,
    HttpStatusError,
    JsonHttpClient,
    default_backoff,
)
from registry_client.manifest import (
    DigestCache,
    ExternalDataCache,
    check_attachments,
    check_manifest,
    external_data_files,
    external_sources,
    manifest_digest,
    sha256_file,
)
from registry_client.refs import (
    ModelRef,
    parse_ref,
    validate_alias,
    validate_name,
    validate_version,
)
from registry_client.types import ModelVersion, Signature

API = "/api/2.0/mlflow"
ARTIFACTS_API = "/api/2.0/mlflow-artifacts/artifacts"
EXPERIMENT = "batchline-registry"
EXPERIMENT_ARTIFACT_LOCATION = f"mlflow-artifacts:/{EXPERIMENT}"
ARTIFACT = "model.onnx"
MODEL_DIR = "model"
SHA256_TAG = "sha256"
SIGNATURE_TAG = "batchline.signature"
METRICS_TAG = "batchline.metrics"
FEATURES_TAG = "batchline.features"
SOURCE_TAG = "batchline.source"
FILES_TAG = "batchline.files"
MANIFEST_TAG = "batchline.manifest_sha256"
EXTERNAL_DATA_TAG = "batchline.external_data"
# MLflow's limit on a model-version tag value (mlflow.utils.validation, MLflow 2.x and 3.x).
MAX_TAG_VALUE = 100_000
ALIAS_HISTORY_TAG = "batchline.alias_history."
ALIAS_HISTORY_LIMIT = 100
# Deprecated MLflow stages that `name@<alias>` falls back to when no such alias is set.
STAGES = {"production": "Production", "staging": "Staging"}

_SHA256 = re.compile(r"[0-9a-f]{64}")
_CHUNK = 1 << 20
_PAGE = 1000
_log = logging.getLogger(__name__)


class MlflowRegistry:
    """A Registry backed by an MLflow tracking server, reached over its REST API.

    Guarantees, beyond the Registry protocol's: a version's files (model.onnx, its external
    data, its attachments) are cached under ``cache_dir/<name>/<version>/`` and a cached copy is
    used only while it hashes to its manifest entry (a corrupt copy is downloaded again; a
    download that does not match raises ChecksumMismatch and leaves the cache untouched; a file
    in the cached folder that the manifest does not list is removed); a server that refuses connections,
    times out or answers 5xx is retried with capped exponential backoff and then reported as
    RegistryUnavailable naming its URL; nothing is cached between calls except verified
    artifacts, so a restarted server is picked up by the same client.
    """

    def __init__(
        self,
        base_url: str,
        *,
        cache_dir: Path | str,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        retries: int = DEFAULT_RETRIES,
        backoff: Callable[[int], float] = default_backoff,
        sleep: Callable[[float], None] = time.sleep,
        token: str | None = None,
    ) -> None:
        base_url = base_url.removeprefix("mlflow+")
        headers = {"Authorization": f"Bearer {token}"} if token else None
        self._http = JsonHttpClient(
            base_url,
            timeout_s=timeout_s,
            retries=retries,
            backoff=backoff,
            sleep=sleep,
            headers=headers,
        )
        self._cache = Path(cache_dir).expanduser().resolve()
        self._digests = DigestCache()
        self._external = ExternalDataCache(self._digests)
        # Versions fetched (so verified) here: attachment() needs no server for them.
        self._fetched: dict[tuple[str, str], ModelVersion] = {}
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"MlflowRegistry({self.base_url!r}, cache_dir={str(self._cache)!r})"

    @property
    def base_url(self) -> str:
        return self._http.base_url

    @property
    def cache_dir(self) -> Path:
        return self._cache

    # -- reads -------------------------------------------------------------------------------

    def list_models(self) -> list[str]:
        names: list[str] = []
        token = ""
        while True:
            params: dict[str, str | int] = {"max_results": _PAGE}
            if token:
                params["page_token"] = token
            doc = self._http.get(f"{API}/registered-models/search", params)
            names.extend(str(m["name"]) for m in doc.get("registered_models", []))
            token = str(doc.get("next_page_token", ""))
            if not token:
                return sorted(names)

    def list_versions(self, name: str) -> list[ModelVersion]:
        """Every READY version of `name` (MLflow's pending or failed registrations are left out)."""
        records = self._search_versions(validate_name(name))
        if not records:
            self._registered_model(name)  # ModelNotFound, or a model with no versions yet
        return [self._to_model_version(r) for r in records]

    def get_version(self, name: str, version: str) -> ModelVersion:
        validate_name(name)
        version = validate_version(version)
        try:
            doc = self._http.get(f"{API}/model-versions/get", {"name": name, "version": version})
        except HttpStatusError as exc:
            if _not_found(exc):
                raise self._version_not_found(name, version) from None
            raise
        return self._to_model_version(doc["model_version"])

    def resolve(self, ref: str | ModelRef) -> ModelVersion:
        parsed = parse_ref(ref) if isinstance(ref, str) else ref
        if parsed.version is not None:
            return self.get_version(parsed.name, parsed.version)
        name, alias = parsed.name, parsed.alias
        assert alias is not None
        try:
            doc = self._http.get(f"{API}/registered-models/alias", {"name": name, "alias": alias})
        except HttpStatusError as exc:
            # MLflow answers 404 for an unknown model but 400 INVALID_PARAMETER_VALUE for an
            # unknown alias; either way, ask the model itself what is set.
            if exc.status not in {400, 404}:
                raise
        else:
            return self._to_model_version(doc["model_version"])
        model = self._registered_model(name)
        aliases = _aliases_of(model)
        if alias in aliases:  # set between the two calls
            return self.get_version(name, aliases[alias])
        stage = STAGES.get(alias)
        if stage is not None:
            doc = self._http.post(
                f"{API}/registered-models/get-latest-versions",
                {"name": name, "stages": [stage]},
                idempotent=True,
            )
            latest = [r for r in doc.get("model_versions", []) if r.get("current_stage") == stage]
            if latest:
                return self._to_model_version(max(latest, key=lambda r: int(r["version"])))
        raise AliasNotFound(name, alias, tuple(sorted(aliases)))

    def aliases(self, name: str) -> dict[str, str]:
        return _aliases_of(self._registered_model(validate_name(name)))

    def alias_history(self, name: str, alias: str) -> list[tuple[str, str]]:
        """(version, ISO-8601 UTC time) per move, oldest first; "" where the time is unknown."""
        alias = validate_alias(alias)
        model = self._registered_model(validate_name(name))
        aliases = _aliases_of(model)
        history = [(h["version"], h["at"]) for h in _history_of(model, alias)]
        current = aliases.get(alias)
        if current is not None and (not history or history[-1][0] != current):
            history.append((current, ""))
        if not history:
            raise AliasNotFound(name, alias, tuple(sorted(aliases)))
        return history

    def fetch(self, mv: ModelVersion) -> Path:
        """model.onnx's cached path, once every file of the version in the cache matches its
        manifest entry (downloading what is missing or does not match)."""
        if _SHA256.fullmatch(mv.sha256) is None:
            raise RegistryError(
                f"model {mv.name!r} version {mv.version} has no valid {SHA256_TAG!r} tag, so its "
                "artifact cannot be verified: register it with batchline or set the tag"
            )
        files = dict(mv.files) or {ARTIFACT: mv.sha256}
        if mv.files:
            check_manifest(
                mv.files,
                sha256=mv.sha256,
                digest=mv.manifest_sha256,
                external_data=mv.external_data,
                where=f"the batchline tags of model {mv.name!r} version {mv.version} on "
                f"{self.base_url}",
            )
        folder = self._cache_folder(mv)
        for relative in sorted(files, key=lambda f: (f != ARTIFACT, f)):
            self._cached(mv, folder, relative, files[relative])
        model = folder / ARTIFACT
        for relative in self._external_data(model, mv.sha256):
            if relative not in mv.external_data:
                how = (
                    "register the model again"
                    if mv.files
                    else "it was registered without a batchline manifest, so nothing uploads or "
                    "verifies that file: register it with batchline"
                )
                raise ManifestError(
                    f"model {mv.name!r} version {mv.version}: the graph references external data "
                    f"{relative!r} that the version's manifest does not list; {how}"
                )
        _sweep(folder, files)
        with self._lock:
            self._fetched[(mv.name, mv.version)] = mv
        return model

    def attachment(self, name: str, version: str, filename: str) -> Path:
        """The cached path of a file registered alongside a version, after it matched its
        manifest entry (downloaded if needed). AttachmentNotFound if there is no such file."""
        validate_name(name)
        version = validate_version(version)
        filename = validate_name(filename, what="attachment name")
        with self._lock:
            mv = self._fetched.get((name, version))
        if mv is None:
            mv = self.get_version(name, version)
        if filename not in mv.files:
            known = tuple(
                sorted(f for f in mv.files if f != ARTIFACT and f not in mv.external_data)
            )
            raise AttachmentNotFound(name, version, filename, known)
        return self._cached(mv, self._cache_folder(mv), filename, mv.files[filename])

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
        """Upload the artifact, the external-data files its graph references (from beside it)
        and any attachments through the server's artifact proxy; create the next version with
        the manifest in its tags."""
        validate_name(name)
        src = Path(artifact_path)
        if not src.is_file():
            raise RegistryError(f"cannot register model {name!r}: artifact {src} is not a file")
        user_tags = {str(k): str(v) for k, v in (tags or {}).items()}
        for key in user_tags:
            if _reserved_tag(key):
                raise InvalidName(
                    key, "tag keys 'sha256', 'batchline.*' and 'mlflow.*' are reserved"
                )
        metric_values = {str(k): float(v) for k, v in (metrics or {}).items()}
        extra = check_attachments(name, attachments)
        try:
            external = external_data_files(src)
        except RegistryError as exc:
            raise type(exc)(f"cannot register model {name!r}: {exc}") from None
        uploads = {ARTIFACT: src, **external_sources(name, src, external, extra), **extra}
        files = {relative: sha256_file(path) for relative, path in uploads.items()}
        digest = files[ARTIFACT]
        manifest = _dumps(files)
        if len(manifest) > MAX_TAG_VALUE:
            raise RegistryError(
                f"cannot register model {name!r}: its manifest of {len(files)} files is "
                f"{len(manifest)} characters, over MLflow's tag limit of {MAX_TAG_VALUE}; save "
                "the model's external data into fewer files (all_tensors_to_one_file=True)"
            )

        self._ensure_registered_model(name)
        run_id, artifact_root = self._start_run(name, source)
        try:
            upload = _proxy_path(artifact_root)
            if upload is None:
                raise RegistryError(
                    f"experiment {EXPERIMENT!r} on {self.base_url} stores artifacts at "
                    f"{artifact_root}, which cannot be uploaded to over REST; delete the experiment "
                    "(batchline recreates it on the artifact proxy) and run the server with "
                    "artifact serving on"
                )
            for relative, path in uploads.items():
                self._http.put_file(
                    f"{ARTIFACTS_API}/{_quote(upload)}/{MODEL_DIR}/{_quote(relative)}", path
                )
            if metric_values:
                now_ms = _now_ms()
                self._http.post(
                    f"{API}/runs/log-batch",
                    {
                        "run_id": run_id,
                        "metrics": [
                            {"key": k, "value": v, "timestamp": now_ms, "step": 0}
                            for k, v in metric_values.items()
                        ],
                    },
                    idempotent=True,
                )
            self._end_run(run_id, "FINISHED")
        except BaseException:
            self._end_run(run_id, "FAILED", quiet=True)
            raise

        version_tags = {
            **user_tags,
            SHA256_TAG: digest,
            FILES_TAG: manifest,
            MANIFEST_TAG: manifest_digest(files),
            EXTERNAL_DATA_TAG: _dumps(list(external)),
            SIGNATURE_TAG: _dumps(signature.to_dict()),
            METRICS_TAG: _dumps(metric_values),
            FEATURES_TAG: _dumps(list(features)),
            SOURCE_TAG: source,
        }
        # Not idempotent: a retry after a timeout could create a second version.
        doc = self._http.post(
            f"{API}/model-versions/create",
            {
                "name": name,
                "source": f"{artifact_root}/{MODEL_DIR}",
                "run_id": run_id,
                "description": description,
                "tags": [{"key": k, "value": v} for k, v in version_tags.items()],
            },
        )
        return self._to_model_version(doc["model_version"])

    def set_alias(self, name: str, alias: str, version: str) -> None:
        """Point `alias` at `version` and append the move to the alias history tag."""
        alias = validate_alias(alias)
        version = validate_version(version)
        model = self._registered_model(validate_name(name))
        current = _aliases_of(model).get(alias)
        if current == version:
            return
        try:
            self._http.post(
                f"{API}/registered-models/alias",
                {"name": name, "alias": alias, "version": version},
                idempotent=True,
            )
        except HttpStatusError as exc:
            if _not_found(exc):
                raise self._version_not_found(name, version) from None
            raise
        history = _history_of(model, alias)
        if current is not None and (not history or history[-1]["version"] != current):
            history.append({"version": current, "at": ""})
        history.append({"version": version, "at": _utc_now()})
        self._http.post(
            f"{API}/registered-models/set-tag",
            {
                "name": name,
                "key": ALIAS_HISTORY_TAG + alias,
                "value": _dumps(history[-ALIAS_HISTORY_LIMIT:]),
            },
            idempotent=True,
        )

    # -- internals ---------------------------------------------------------------------------

    def _registered_model(self, name: str) -> dict[str, Any]:
        try:
            doc = self._http.get(f"{API}/registered-models/get", {"name": name})
        except HttpStatusError as exc:
            if _not_found(exc):
                raise ModelNotFound(name) from None
            raise
        model: dict[str, Any] = doc["registered_model"]
        return model

    def _search_versions(self, name: str) -> list[dict[str, Any]]:
        records: list[dict[str, Any]] = []
        token = ""
        while True:
            params: dict[str, str | int] = {"filter": f"name='{name}'", "max_results": _PAGE}
            if token:
                params["page_token"] = token
            doc = self._http.get(f"{API}/model-versions/search", params)
            records.extend(doc.get("model_versions", []))
            token = str(doc.get("next_page_token", ""))
            if not token:
                break
        ready = [r for r in records if r.get("status", "READY") == "READY"]
        return sorted(ready, key=lambda r: int(r["version"]))

    def _version_not_found(self, name: str, version: str) -> RegistryError:
        self._registered_model(name)  # raises ModelNotFound when the model is what's missing
        known = tuple(str(r["version"]) for r in self._search_versions(name))
        return VersionNotFound(name, version, known)

    def _ensure_registered_model(self, name: str) -> None:
        try:
            # Idempotent in effect: a retried create that already happened says ALREADY_EXISTS.
            self._http.post(f"{API}/registered-models/create", {"name": name}, idempotent=True)
        except HttpStatusError as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise

    def _experiment_id(self) -> str:
        path = f"{API}/experiments/get-by-name"
        try:
            doc = self._http.get(path, {"experiment_name": EXPERIMENT})
        except HttpStatusError as exc:
            if not _not_found(exc):
                raise
            try:
                created = self._http.post(
                    f"{API}/experiments/create",
                    {"name": EXPERIMENT, "artifact_location": EXPERIMENT_ARTIFACT_LOCATION},
                    idempotent=True,
                )
                return str(created["experiment_id"])
            except HttpStatusError as exc2:
                if exc2.error_code != "RESOURCE_ALREADY_EXISTS":  # another writer won the race
                    raise
            doc = self._http.get(path, {"experiment_name": EXPERIMENT})
        experiment = doc["experiment"]
        if experiment.get("lifecycle_stage") == "deleted":
            raise RegistryError(
                f"experiment {EXPERIMENT!r} on {self.base_url} is deleted: restore it "
                "(or purge it with `mlflow gc`) before registering"
            )
        return str(experiment["experiment_id"])

    def _start_run(self, name: str, source: str) -> tuple[str, str]:
        doc = self._http.post(
            f"{API}/runs/create",
            {
                "experiment_id": self._experiment_id(),
                "run_name": f"register {name}",
                "start_time": _now_ms(),
                "tags": [{"key": "mlflow.source.name", "value": source or "batchline"}],
            },
            # A retried create at worst leaves an empty extra run behind.
            idempotent=True,
        )
        info = doc["run"]["info"]
        return str(info["run_id"]), str(info["artifact_uri"]).rstrip("/")

    def _end_run(self, run_id: str, status: str, *, quiet: bool = False) -> None:
        try:
            self._http.post(
                f"{API}/runs/update",
                {"run_id": run_id, "status": status, "end_time": _now_ms()},
                idempotent=True,
            )
        except RegistryError:
            if not quiet:
                raise

    def _download(self, mv: ModelVersion, relative: str, sink: IO[bytes]) -> None:
        """One file of the version (a path relative to model.onnx's folder) into `sink`."""
        try:
            proxied = _proxy_path(self._artifact_location(mv))
            if proxied is not None:
                if relative != ARTIFACT:
                    proxied = f"{posixpath.dirname(proxied)}/{relative}"
                self._http.download(f"{ARTIFACTS_API}/{_quote(proxied)}", sink)
            else:
                # A store only the server can read (a local path under --default-artifact-root,
                # a bucket it has keys for): the UI's download route streams the file through
                # the server. That route fails on proxied and runs:/ locations, hence the above.
                self._http.download(
                    "/model-versions/get-artifact",
                    sink,
                    {"name": mv.name, "version": mv.version, "path": relative},
                )
        except HttpStatusError as exc:
            if _not_found(exc):
                raise RegistryError(
                    f"artifact {_remote(mv, relative)} of model {mv.name!r} version {mv.version} "
                    f"is missing on {self.base_url}"
                ) from None
            raise

    def _artifact_location(self, mv: ModelVersion) -> str:
        """Where model.onnx really is: ``runs:/`` and ``models:/`` sources resolved."""
        uri = mv.artifact
        if urllib.parse.urlsplit(uri).scheme not in {"mlflow-artifacts", "runs"}:
            # The server resolved models:/ sources to a storage location at registration.
            doc = self._http.get(
                f"{API}/model-versions/get-download-uri", {"name": mv.name, "version": mv.version}
            )
            uri = _artifact_of(str(doc.get("artifact_uri", "")))
        if urllib.parse.urlsplit(uri).scheme == "runs":
            # runs:/<run_id>/<path>, relative to the run's artifact root.
            run_id, _, relative = urllib.parse.urlsplit(uri).path.lstrip("/").partition("/")
            doc = self._http.get(f"{API}/runs/get", {"run_id": run_id})
            root = str(doc["run"]["info"]["artifact_uri"]).rstrip("/")
            uri = f"{root}/{relative}"
        return uri

    def _cache_folder(self, mv: ModelVersion) -> Path:
        return self._cache / validate_name(mv.name) / validate_version(mv.version)

    def _cached(self, mv: ModelVersion, folder: Path, relative: str, expected: str) -> Path:
        """`folder/relative`, verified against `expected`; downloaded (to a temporary file
        beside the version's folder, renamed in once it matches) when missing or different."""
        dest = folder / relative
        if dest.is_symlink() or (dest.exists() and not dest.is_file()):
            _log.warning("cache entry %s is not a plain file; downloading again", dest)
            _remove(dest)
        elif dest.is_file():
            actual = self._digests.digest(dest)
            if actual == expected:
                return dest
            _log.warning(
                "cached %s of %s@%s does not match its sha256 (%s); downloading again",
                dest,
                mv.name,
                mv.version,
                actual,
            )
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder.parent, prefix=f".{folder.name}.", suffix=".part")
        try:
            with os.fdopen(fd, "w+b") as f:
                self._download(mv, relative, f)
                f.seek(0)
                actual = _sha256_stream(f)
                os.fsync(f.fileno())
            if actual != expected:
                raise ChecksumMismatch(
                    _remote(mv, relative),
                    expected,
                    actual,
                    f"the copy on {self.base_url} is not what was registered: restore it there, "
                    "or register the model again",
                )
            os.chmod(tmp, 0o644)
            os.replace(tmp, dest)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return dest

    def _external_data(self, model: Path, sha256: str) -> tuple[str, ...]:
        return self._external.files(model, sha256)

    def _to_model_version(self, record: Mapping[str, Any]) -> ModelVersion:
        name, version = str(record["name"]), str(record["version"])
        tags = {str(t["key"]): str(t.get("value", "")) for t in record.get("tags", [])}
        raw_signature = tags.get(SIGNATURE_TAG)
        try:
            signature = (
                Signature.from_dict(json.loads(raw_signature))
                if raw_signature
                else Signature(inputs=(), outputs=())
            )
            metrics = {str(k): float(v) for k, v in json.loads(tags.get(METRICS_TAG, "{}")).items()}
            features = tuple(str(f) for f in json.loads(tags.get(FEATURES_TAG, "[]")))
            files = {str(k): str(v) for k, v in json.loads(tags.get(FILES_TAG, "{}")).items()}
            external = tuple(str(f) for f in json.loads(tags.get(EXTERNAL_DATA_TAG, "[]")))
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise RegistryError(
                f"model {name!r} version {version}: malformed batchline tag: {exc!r}"
            ) from exc
        run_id = str(record.get("run_id", ""))
        source = tags.get(SOURCE_TAG) or (f"runs:/{run_id}" if run_id else "")
        return ModelVersion(
            name=name,
            version=version,
            artifact=_artifact_of(str(record.get("source", ""))),
            sha256=tags.get(SHA256_TAG, ""),
            signature=signature,
            metrics=metrics,
            created=_iso_from_ms(int(record.get("creation_timestamp", 0))),
            source=source,
            tags={k: v for k, v in tags.items() if not _reserved_tag(k)},
            features=features,
            description=str(record.get("description", "")),
            files=files,
            manifest_sha256=tags.get(MANIFEST_TAG, ""),
            external_data=external,
        )


def _not_found(exc: HttpStatusError) -> bool:
    return exc.status == 404 or exc.error_code == "RESOURCE_DOES_NOT_EXIST"


def _aliases_of(model: Mapping[str, Any]) -> dict[str, str]:
    return {str(a["alias"]): str(a["version"]) for a in model.get("aliases", [])}


def _history_of(model: Mapping[str, Any], alias: str) -> list[dict[str, str]]:
    key = ALIAS_HISTORY_TAG + alias
    raw = next((t.get("value", "") for t in model.get("tags", []) if t.get("key") == key), "")
    if not raw:
        return []
    try:
        entries = json.loads(raw)
        return [{"version": str(e["version"]), "at": str(e.get("at", ""))} for e in entries]
    except (ValueError, TypeError, KeyError) as exc:
        raise RegistryError(
            f"model {model.get('name')!r}: malformed alias history tag {key!r} ({exc}); "
            "fix or delete the tag"
        ) from exc


def _remote(mv: ModelVersion, relative: str) -> str:
    """The URI of one file of the version, for messages."""
    if relative == ARTIFACT:
        return mv.artifact
    return f"{posixpath.dirname(mv.artifact)}/{relative}"


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _sweep(folder: Path, files: Mapping[str, str]) -> None:
    """Remove from a cached version folder whatever its manifest does not list."""
    for current, dirnames, filenames in os.walk(folder):
        base = Path(current)
        prefix = base.relative_to(folder).as_posix()
        prefix = "" if prefix == "." else prefix + "/"
        for entry in [*dirnames, *filenames]:
            relative = prefix + entry
            path = base / entry
            if relative in files and path.is_file() and not path.is_symlink():
                continue
            if entry in dirnames and not path.is_symlink() and _holds_listed(relative, files):
                continue
            _log.warning(
                "removing %s from the cache: the version's manifest does not list it", path
            )
            _remove(path)
        dirnames[:] = [d for d in dirnames if (base / d).is_dir()]


def _holds_listed(folder: str, files: Mapping[str, str]) -> bool:
    return any(f.startswith(folder + "/") for f in files)


def _reserved_tag(key: str) -> bool:
    return key == SHA256_TAG or key.startswith(("batchline.", "mlflow."))


def _artifact_of(source: str) -> str:
    """The URI of model.onnx for a version's source (a folder, or the file itself)."""
    if not source or source.endswith(".onnx"):
        return source
    return f"{source.rstrip('/')}/{ARTIFACT}"


def _proxy_path(uri: str) -> str | None:
    """The path of an ``mlflow-artifacts:`` URI under the artifact proxy, or None."""
    parts = urllib.parse.urlsplit(uri)
    if parts.scheme != "mlflow-artifacts":
        return None
    return parts.path.lstrip("/")


def _quote(path: str) -> str:
    return urllib.parse.quote(path, safe="/")


def _sha256_stream(f: IO[bytes]) -> str:
    digest = hashlib.sha256()
    while chunk := f.read(_CHUNK):
        digest.update(chunk)
    return digest.hexdigest()


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), sort_keys=True)


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _iso_from_ms(ms: int) -> str:
    moment = datetime.fromtimestamp(ms // 1000, UTC).replace(microsecond=(ms % 1000) * 1000)
    return moment.isoformat(timespec="microseconds").replace("+00:00", "Z")
