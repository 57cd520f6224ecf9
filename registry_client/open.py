"""open_registry: a registry from one string, as given to ``--registry`` or in batchline.toml."""

from __future__ import annotations

import os
import re
import urllib.parse
from pathlib import Path

from registry_client.errors import RegistryError
from registry_client.file_registry import FileRegistry
from registry_client.mlflow_registry import MlflowRegistry
from registry_client.protocol import Registry

MLFLOW_SCHEMES = ("mlflow+http", "mlflow+https")


def open_registry(spec: str, *, cache_dir: Path | str | None = None) -> Registry:
    """`spec` is a folder (FileRegistry) or ``mlflow+http(s)://host:port[/prefix]`` (MLflow).

    MLflow artifacts are cached in `cache_dir`, by default
    ``$XDG_CACHE_HOME/batchline/mlflow/<host>_<port>`` (``~/.cache/...`` without XDG_CACHE_HOME).
    A ``file://`` URI names a folder too; any other scheme is refused rather than guessed at.
    """
    if not spec:
        raise RegistryError("empty registry: give a folder or mlflow+http(s)://host:port")
    parts = urllib.parse.urlsplit(spec)
    if parts.scheme in MLFLOW_SCHEMES:
        if not parts.hostname:
            raise RegistryError(f"registry {spec!r} names no host")
        url = spec.removeprefix("mlflow+")
        return MlflowRegistry(url, cache_dir=cache_dir or default_cache_dir(url))
    if parts.scheme == "file":
        return FileRegistry(urllib.parse.unquote(parts.path))
    if "://" in spec:
        raise RegistryError(
            f"unknown registry {spec!r}: give a folder or mlflow+http(s)://host:port "
            "(an MLflow server's URL needs the 'mlflow+' prefix)"
        )
    return FileRegistry(Path(spec))


def default_cache_dir(url: str) -> Path:
    """Where artifacts from the MLflow server at `url` are cached unless told otherwise."""
    parts = urllib.parse.urlsplit(url)
    server = re.sub(r"[^A-Za-z0-9.-]+", "_", f"{parts.hostname}_{parts.port or ''}{parts.path}")
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "batchline" / "mlflow" / server.strip("_")
