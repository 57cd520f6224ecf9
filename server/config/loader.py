"""load_settings: batchline.toml, then BATCHLINE_* environment variables, then flags.

The document (`BatchlineSettings`, a pydantic-settings model) is the TOML file's shape: a
section per table. pydantic-settings' environment source reads every key of it from
`BATCHLINE_<SECTION>__<KEY>` (nested with `__`, any case: BATCHLINE_SERVER__GRPC_PORT,
BATCHLINE_MODELS__CHURN__MAX_BATCH_SIZE, BATCHLINE_MODELS__CHURN__BREAKER__SLIDING_WINDOW_SIZE,
BATCHLINE_DRIFT__SAMPLE_RATIO); lists and tables as JSON. The older names (`_LEGACY_ENV`) still
work; where both are set the nested name wins.

The three layers are merged first (a later layer wins key by key; [model_defaults] then fills
what a model's table leaves out, and the model flags apply to every model), then the whole
document is validated once, so every problem is reported together, the first first.
"""

from __future__ import annotations

import dataclasses
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from server.config.drift import DriftSettings
from server.config.models import ModelDefaults, ModelSettings
from server.config.server import ServerSettings
from server.config.tracing import TracingSettings
from server.config.validation import Loc, dotted, messages
from server.errors import ConfigError

ENV_PREFIX = "BATCHLINE_"
ENV_NESTING = "__"

# The environment variables that worked before every key did; each still sets its key.
_LEGACY_ENV: dict[str, Loc] = {
    "BATCHLINE_HOST": ("server", "host"),
    "BATCHLINE_GRPC_PORT": ("server", "grpc_port"),
    "BATCHLINE_HTTP_PORT": ("server", "http_port"),
    "BATCHLINE_METRICS_PORT": ("server", "metrics_port"),
    "BATCHLINE_REGISTRY": ("server", "registry"),
    "BATCHLINE_WORKERS": ("server", "workers"),
    "BATCHLINE_GRACE_PERIOD_S": ("server", "grace_period_s"),
    "BATCHLINE_LOG_LEVEL": ("server", "log_level"),
    "BATCHLINE_LOG_FORMAT": ("server", "log_format"),
    "BATCHLINE_POLL_INTERVAL_S": ("server", "poll_interval_s"),
    "BATCHLINE_ADMIN_TOKEN": ("server", "admin_token"),
    "BATCHLINE_ADMIN_TOKEN_FILE": ("server", "admin_token_file"),
    "BATCHLINE_FEATURE_STORE": ("server", "feature_store"),
    "BATCHLINE_DEPLOYMENT": ("server", "deployment"),
    "BATCHLINE_DRIFT_TOKEN": ("drift", "token"),
    "BATCHLINE_DRIFT_TOKEN_FILE": ("drift", "token_file"),
}
LEGACY_ENV = tuple(_LEGACY_ENV)


class BatchlineSettings(BaseSettings):
    """The whole batchline.toml: one field per table, each a section class."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter=ENV_NESTING,
        case_sensitive=False,
        extra="forbid",
        frozen=True,
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # load_settings merges the layers itself (the file, the environment it is given, the
        # flags): validating the document reads nothing more, not os.environ, not a .env file.
        return (init_settings,)

    server: ServerSettings = Field(default_factory=ServerSettings)
    model_defaults: ModelDefaults = Field(default_factory=ModelDefaults)
    models: dict[str, ModelSettings] = Field(default_factory=dict)
    # The drift producer in the server and the sidecar process ([drift]; server/drift).
    drift: DriftSettings = Field(default_factory=DriftSettings)
    # Which requests are traced and where spans go ([tracing]; server/observability/tracing).
    tracing: TracingSettings = Field(default_factory=TracingSettings)


@dataclass(frozen=True)
class Settings:
    """What a process runs with: the server, the models (in the file's order, then --model's),
    the drift producer and sidecar, tracing. Each component takes its own section."""

    server: ServerSettings = field(default_factory=ServerSettings)
    models: tuple[ModelSettings, ...] = ()
    drift: DriftSettings = field(default_factory=DriftSettings)
    tracing: TracingSettings = field(default_factory=TracingSettings)


class _MappingEnvSource(EnvSettingsSource):
    """pydantic-settings' environment source over a given mapping (not os.environ), keeping a
    value that is not JSON where JSON is expected, so it is reported as a bad value of its key
    rather than as a parse failure of the whole source."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self._given = env
        super().__init__(BatchlineSettings)

    def _load_env_vars(self) -> Mapping[str, str | None]:
        return {name.lower(): value for name, value in self._given.items()}

    def decode_complex_value(self, field_name: str, field: FieldInfo, value: Any) -> Any:
        try:
            return super().decode_complex_value(field_name, field, value)
        except ValueError:
            return value


def _merge(lower: Mapping[str, Any], upper: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(lower)
    for key, value in upper.items():
        below = out.get(key)
        if isinstance(below, Mapping) and isinstance(value, Mapping):
            out[key] = _merge(below, value)
        else:
            out[key] = value
    return out


def _put(tree: dict[str, Any], loc: Loc, value: Any) -> None:
    for part in loc[:-1]:
        nested = tree.setdefault(str(part), {})
        if not isinstance(nested, dict):
            return
        tree = nested
    tree[str(loc[-1])] = value


def _read_file(path: str | Path | None) -> dict[str, Any]:
    if path is None:
        return {}
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None


def _from_env(
    env: Mapping[str, str], model_names: list[str]
) -> tuple[dict[str, Any], dict[Loc, str]]:
    """The environment layer and, per key, the variable it came from."""
    found = {name: value for name, value in env.items() if name.upper().startswith(ENV_PREFIX)}
    layer = _MappingEnvSource(found)() if found else {}
    # Variable names are case-insensitive, model names are not: a model of the file keeps its
    # spelling (BATCHLINE_MODELS__CHURNV2__... sets [models.ChurnV2]).
    spelling = {name.lower(): name for name in model_names}
    models = layer.get("models")
    if isinstance(models, dict):
        layer["models"] = {spelling.get(k, k): v for k, v in models.items()}
    sources: dict[Loc, str] = {}
    for name in found:
        rest = name[len(ENV_PREFIX) :].lower()
        if ENV_NESTING in rest:
            loc: Loc = tuple(rest.split(ENV_NESTING))
            if loc[0] == "models" and len(loc) > 1:
                loc = ("models", spelling.get(str(loc[1]), loc[1]), *loc[2:])
            sources[loc] = name
    for name, loc in _LEGACY_ENV.items():
        if name in env and loc not in sources:
            _put(layer, loc, env[name])
            sources[loc] = name
    # The drift token and its file: set only when not empty, and one replaces the other, so a
    # token in the environment wins over a file in the config and the other way round.
    drift = layer.get("drift")
    if isinstance(drift, dict):
        for key in ("token", "token_file"):
            if drift.get(key) == "":
                del drift[key]
        if "token" in drift and "token_file" not in drift:
            drift["token_file"] = ""
        elif "token_file" in drift and "token" not in drift:
            drift["token"] = ""
    return layer, sources


def _flag(key: str) -> str:
    return f"--{key.replace('_', '-')}"


def load_settings(
    path: str | Path | None = None,
    *,
    env: Mapping[str, str] | None = None,
    server_overrides: Mapping[str, Any] | None = None,
    model_refs: tuple[str, ...] = (),
    model_overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Build Settings from a TOML file, the environment and flags (later wins).

    `env` is read for BATCHLINE_* variables (None: none); `model_refs` (from `--model
    NAME@ALIAS`) add models or replace their ref; `model_overrides` apply to every model (flags
    such as --max-batch-size). A ConfigError lists every problem, the first first."""
    problems: list[str] = []
    data = _read_file(path)
    tables = data.get("models", {})
    env_layer, sources = _from_env(env or {}, list(tables) if isinstance(tables, Mapping) else [])
    flags: dict[str, Any] = {}
    for key, value in (server_overrides or {}).items():
        if value is not None:
            flags[key] = value
            sources[("server", key)] = _flag(key)
    doc = _merge(_merge(data, env_layer), {"server": flags} if flags else {})

    defaults = doc.get("model_defaults", {})
    if not isinstance(defaults, Mapping):
        problems.append(f"model_defaults: expected a table, got {defaults!r}")
        defaults = {}
        doc.pop("model_defaults")
    tables = doc.pop("models", {})
    if not isinstance(tables, Mapping):
        problems.append(f"models: expected a table of [models.NAME] tables, got {tables!r}")
        tables = {}
    models: dict[str, dict[str, Any]] = {}
    for name, table in tables.items():
        if not isinstance(table, Mapping):
            problems.append(f"models.{name}: expected a table")
            continue
        if "name" in table:
            known = ", ".join(sorted(f.name for f in dataclasses.fields(ModelDefaults)))
            problems.append(f"unknown key models.{name}.name (known: {known})")
        models[name] = {k: v for k, v in table.items() if k != "name"}
    given: dict[str, str] = {}
    for ref in model_refs:
        name = ref.split("@", 1)[0]
        if "@" not in ref or not name:
            problems.append(f"--model: expected NAME@ALIAS or NAME@VERSION, got {ref!r}")
            continue
        if given.get(name, ref) != ref:
            # One version per model name answers by default; a second one is a route.
            problems.append(
                f"--model {given[name]} and --model {ref} both serve model {name!r}: give one; "
                f"to run another version beside it use --canary VERSION --canary-percent P or "
                f"--shadow VERSION"
            )
            continue
        given[name] = ref
        models.setdefault(name, {})["ref"] = ref
    aliases: dict[Loc, Loc] = {}
    for name, table in models.items():
        for key in defaults:
            if key not in table:
                aliases[("models", name, key)] = ("model_defaults", key)
        merged = {**defaults, **table}
        merged.setdefault("ref", f"{name}@production")
        for key, value in (model_overrides or {}).items():
            if value is not None:
                merged[key] = value
                sources[("models", name, key)] = _flag(key)
                aliases.pop(("models", name, key), None)
        models[name] = {**merged, "name": name}
    doc["models"] = models

    try:
        document = BatchlineSettings.model_validate(doc)
    except ValidationError as exc:
        problems += messages(
            exc.errors(), root=BatchlineSettings, raw=doc, sources=sources, aliases=aliases
        )
    if problems:
        raise ConfigError.of(list(dict.fromkeys(problems)))
    return Settings(
        server=document.server,
        models=tuple(document.models.values()),
        drift=document.drift,
        tracing=document.tracing,
    )


def env_name(loc: Loc) -> str:
    """The environment variable that sets the key at `loc` (("server", "grpc_port") ->
    BATCHLINE_SERVER__GRPC_PORT)."""
    return ENV_PREFIX + ENV_NESTING.join(str(part) for part in loc).upper()


__all__ = [
    "LEGACY_ENV",
    "BatchlineSettings",
    "Settings",
    "dotted",
    "env_name",
    "load_settings",
]
