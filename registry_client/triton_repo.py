"""`batchline registry import DIR`: a Triton model repository, or one bare .onnx, into a registry.

A Triton repository is ``NAME/config.pbtxt`` plus ``NAME/<N>/model.onnx`` per version (the file
name may be set by ``default_model_filename``). Each version is registered in Triton's version
order (batchline numbers its own versions 1, 2, ...), and the alias (production by default) is
pointed at the newest, as Triton's default version policy serves the latest. From config.pbtxt
the serving settings batchline has an equivalent for are read (``max_batch_size``,
``dynamic_batching.max_queue_delay_microseconds`` and ``preferred_batch_size``, the
``instance_group`` count) and returned, kept on each version as ``triton.*`` tags, and printed as
a ``[models.NAME]`` table for batchline.toml. Models of other platforms (TensorRT, Python, ...)
are refused, naming the model and its platform.

config.pbtxt is protobuf text format; the small reader here handles what Triton configs use
(fields, nested messages, lists, strings, numbers, enums, comments) without the Triton protos.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from registry_client.errors import RegistryError
from registry_client.protocol import Registry
from registry_client.types import ModelVersion, Signature

ONNX_PLATFORMS = ("onnxruntime_onnx",)
ONNX_BACKENDS = ("onnxruntime",)
_TOKEN = re.compile(
    r"""(?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')
      | (?P<punct>[{}\[\]:,;<>])
      | (?P<word>[A-Za-z0-9_.+\-]+)""",
    re.VERBOSE,
)


class ConfigSyntaxError(RegistryError):
    pass


def _tokens(text: str, where: str) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    pos = 0
    text = text + "\n"
    while True:
        while pos < len(text) and (text[pos].isspace() or text[pos] == "#"):
            if text[pos] == "#":
                pos = text.index("\n", pos)
            pos += 1
        if pos >= len(text):
            return out
        match = _TOKEN.match(text, pos)
        if match is None or match.end() == pos:
            line = text.count("\n", 0, pos) + 1
            raise ConfigSyntaxError(f"{where}: line {line}: cannot read {text[pos : pos + 20]!r}")
        kind = match.lastgroup or ""
        out.append((kind, match.group(kind)))
        pos = match.end()


def parse_pbtxt(text: str, where: str = "config.pbtxt") -> dict[str, list[Any]]:
    """Protobuf text format -> {field: [values]}; a nested message is such a dict itself."""
    tokens = _tokens(text, where)
    pos = 0

    def fail(message: str) -> ConfigSyntaxError:
        return ConfigSyntaxError(f"{where}: {message}")

    def value() -> Any:
        nonlocal pos
        if pos >= len(tokens):
            raise fail("a value is missing at the end")
        kind, text_ = tokens[pos]
        if kind == "punct" and text_ in "{<":
            pos += 1
            inner = message(close="}" if text_ == "{" else ">")
            return inner
        if kind == "string":
            pos += 1
            return bytes(text_[1:-1], "utf-8").decode("unicode_escape")
        if kind == "word":
            pos += 1
            try:
                return int(text_, 0)
            except ValueError:
                pass
            try:
                return float(text_)
            except ValueError:
                return {"true": True, "false": False}.get(text_, text_)
        raise fail(f"unexpected {text_!r}")

    def message(close: str | None) -> dict[str, list[Any]]:
        nonlocal pos
        fields: dict[str, list[Any]] = {}
        while pos < len(tokens):
            kind, text_ = tokens[pos]
            if close is not None and kind == "punct" and text_ == close:
                pos += 1
                return fields
            if kind == "punct" and text_ in ",;":
                pos += 1
                continue
            if kind != "word":
                raise fail(f"expected a field name, got {text_!r}")
            name = text_
            pos += 1
            if pos < len(tokens) and tokens[pos] == ("punct", ":"):
                pos += 1
            if pos < len(tokens) and tokens[pos] == ("punct", "["):
                pos += 1
                while pos < len(tokens) and tokens[pos] != ("punct", "]"):
                    if tokens[pos] == ("punct", ","):
                        pos += 1
                        continue
                    fields.setdefault(name, []).append(value())
                if pos >= len(tokens):
                    raise fail(f"{name}: the list is not closed with ']'")
                pos += 1
                fields.setdefault(name, [])
            else:
                fields.setdefault(name, []).append(value())
        if close is not None:
            raise fail(f"a message is not closed with {close!r}")
        return fields

    return message(close=None)


def _one(fields: dict[str, list[Any]], name: str, default: Any = None) -> Any:
    values = fields.get(name)
    return values[-1] if values else default


@dataclass(frozen=True)
class ServingSettings:
    """What a Triton config says that batchline's [models.NAME] can say too."""

    max_batch_size: int | None = None
    dynamic_batching: bool | None = None
    max_queue_delay_us: int | None = None
    preferred_batch_sizes: tuple[int, ...] = ()
    instances: int | None = None

    def tags(self) -> dict[str, str]:
        out = {}
        for key, value in self.toml_items():
            out[f"triton.{key}"] = str(value).lower() if isinstance(value, bool) else str(value)
        return out

    def toml_items(self) -> list[tuple[str, Any]]:
        items: list[tuple[str, Any]] = []
        if self.max_batch_size is not None:
            items.append(("max_batch_size", self.max_batch_size))
        if self.dynamic_batching is not None:
            items.append(("dynamic_batching", self.dynamic_batching))
        if self.max_queue_delay_us is not None:
            items.append(("max_queue_delay_us", self.max_queue_delay_us))
        if self.preferred_batch_sizes:
            items.append(("preferred_batch_sizes", list(self.preferred_batch_sizes)))
        if self.instances is not None:
            items.append(("instances", self.instances))
        return items


@dataclass(frozen=True)
class TritonModel:
    name: str
    versions: tuple[tuple[int, Path], ...]  # (Triton version, model file), oldest first
    settings: ServingSettings = field(default_factory=ServingSettings)


def read_config(path: Path, name: str) -> tuple[ServingSettings, str]:
    """(serving settings, default_model_filename) from a model's config.pbtxt."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise RegistryError(f"model {name!r}: cannot read {path}: {exc}") from None
    config = parse_pbtxt(text, str(path))
    platform = _one(config, "platform", "")
    backend = _one(config, "backend", "")
    if (platform or backend) and platform not in ONNX_PLATFORMS and backend not in ONNX_BACKENDS:
        raise RegistryError(
            f"model {name!r}: {path} declares platform {platform or '-'!r}, backend "
            f"{backend or '-'!r}; batchline serves ONNX models (onnxruntime_onnx) only"
        )
    max_batch = _one(config, "max_batch_size")
    if max_batch is not None and (not isinstance(max_batch, int) or max_batch < 0):
        raise RegistryError(f"model {name!r}: {path}: max_batch_size must be an integer >= 0")
    batching = _one(config, "dynamic_batching")
    delay = preferred = None
    if isinstance(batching, dict):
        delay = _one(batching, "max_queue_delay_microseconds")
        preferred = tuple(int(v) for v in batching.get("preferred_batch_size", []))
    instances = None
    groups = config.get("instance_group", [])
    if groups:
        instances = sum(int(_one(g, "count", 1)) for g in groups if isinstance(g, dict))
    settings = ServingSettings(
        # Triton's 0 means "no batching dimension": batchline batches every model, one row at a
        # time then.
        max_batch_size=max(1, max_batch) if max_batch is not None else None,
        dynamic_batching=(batching is not None and (max_batch or 0) > 0)
        if max_batch is not None or batching is not None
        else None,
        max_queue_delay_us=int(delay) if delay is not None else None,
        preferred_batch_sizes=preferred or (),
        instances=instances,
    )
    filename = str(_one(config, "default_model_filename", "model.onnx"))
    return settings, filename


def _model_dir(path: Path, name: str) -> TritonModel | None:
    config = path / "config.pbtxt"
    settings, filename = (
        read_config(config, name) if config.is_file() else (ServingSettings(), "model.onnx")
    )
    versions = []
    for child in path.iterdir():
        if child.is_dir() and child.name.isdecimal():
            model = child / filename
            if not model.is_file():
                raise RegistryError(f"model {name!r}: version {child.name} has no {filename}")
            versions.append((int(child.name), model))
    if not versions:
        if config.is_file():
            raise RegistryError(
                f"model {name!r}: {path} has a config.pbtxt but no version folder (1/, 2/, ...)"
            )
        return None
    return TritonModel(name, tuple(sorted(versions)), settings)


def _has_versions(folder: Path) -> bool:
    return any(c.is_dir() and c.name.isdecimal() for c in folder.iterdir())


def looks_like_models(root: Path) -> bool:
    """Whether `root` holds model files to import (a Triton repository, one model's folder, or
    one .onnx) rather than being a batchline registry."""
    if not root.is_dir():
        return False
    if any(root.glob("*.onnx")) or (root / "config.pbtxt").is_file() or _has_versions(root):
        return True
    return any(
        c.is_dir() and ((c / "config.pbtxt").is_file() or _has_versions(c)) for c in root.iterdir()
    )


def find_models(root: Path, name: str | None = None) -> list[TritonModel]:
    """The models under `root`: a repository (folders of models), one model's folder, or a
    bare .onnx file (named `name`, else after the file)."""
    if root.is_file():
        if root.suffix != ".onnx":
            raise RegistryError(f"{root}: expected a Triton model repository or a .onnx file")
        return [TritonModel(name or root.stem, ((1, root),))]
    if not root.is_dir():
        raise RegistryError(f"{root}: no such folder or file")
    own = _model_dir(root, name or root.name)
    if own is not None:
        return [own]
    # A folder holding one model file and nothing else to import (what a KServe storageUri of
    # one model.onnx downloads to /mnt/models): that file, as one version.
    files = sorted(root.glob("*.onnx"))
    if len(files) == 1 and not any(_has_versions(c) for c in root.iterdir() if c.is_dir()):
        return [TritonModel(name or root.name, ((1, files[0]),))]
    if name is not None:
        raise RegistryError(f"--name fits one model; {root} is a repository of several")
    models = [
        m
        for child in sorted(root.iterdir())
        if child.is_dir() and not child.name.startswith(".")
        for m in [_model_dir(child, child.name)]
        if m is not None
    ]
    if not models:
        raise RegistryError(
            f"{root}: no models found (expected NAME/config.pbtxt and NAME/1/model.onnx)"
        )
    return models


@dataclass(frozen=True)
class Imported:
    model: TritonModel
    versions: tuple[tuple[int, ModelVersion], ...]  # (Triton version, registered version)


def import_models(
    registry: Registry,
    models: list[TritonModel],
    prepare: Callable[[Path], tuple[Path, Signature, dict[str, str]]],
    *,
    source: str,
) -> list[Imported]:
    """Register every version of every model (in Triton's order); `prepare` gives the file to
    register for a model file, its signature and tags (the registry CLI's servable check)."""
    done = []
    for model in models:
        registered = []
        for triton_version, path in model.versions:
            artifact, signature, tags = prepare(path)
            mv = registry.register(
                model.name,
                artifact,
                signature=signature,
                tags={**tags, **model.settings.tags(), "triton.version": str(triton_version)},
                source=source,
                description=f"imported from {path}",
            )
            registered.append((triton_version, mv))
        done.append(Imported(model, tuple(registered)))
    return done


def toml_table(model: TritonModel, ref: str) -> str:
    lines = [f"[models.{model.name}]", f'ref = "{ref}"']
    for key, value in model.settings.toml_items():
        text = ("true" if value else "false") if isinstance(value, bool) else str(value)
        lines.append(f"{key} = {text}")
    return "\n".join(lines)
