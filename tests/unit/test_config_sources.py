"""Every key from the environment (BATCHLINE_SECTION__KEY), the older variable names, and
every problem of a configuration reported at once."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from server.config import (
    BreakerConfig,
    DriftSettings,
    GateConfig,
    ModelDefaults,
    ModelSettings,
    ServerSettings,
    Settings,
    TracingSettings,
    load_settings,
)
from server.errors import ConfigError

# Values that the generic rule below would get wrong (a key with a format, a choice, a file, or
# one that needs a companion key): the text to set, plus any other variables it needs (paths
# below the section). Everything else gets a value of its type that differs from the default.
SPECIAL: dict[str, str] = {
    "server.host": "127.0.0.2",
    "server.http_port": "8080",
    "server.log_level": "debug",
    "server.log_format": "json",
    "server.grpc_transport": "grpcio",
    "server.deployment": "staging-2",
    "server.feature_store": "redis://redis.example:6379/0",
    "drift.grpc_port": "8021",
    "drift.log_level": "warning",
    "drift.alerts": '["accuracy < 0.5"]',
    "ref": "churn@7",
    "fallback_ref": "churn@1",
    "fallback": "static",
    "execution": "inline",
    "gate_action": "log",
    "providers": '["CPUExecutionProvider", "XnnpackExecutionProvider"]',
    "shadows": '["2", "3"]',
    "preferred_batch_sizes": "[8, 16]",
    "fallback_outputs": '{"label": 0}',
    "canary_percent": "12.5",
    "sliding_window_type": "time",
    "tracing.exporter": "console",
}
COMPANIONS: dict[str, dict[str, str]] = {
    "fallback": {"fallback_outputs": '{"label": 0}'},
    "canary_percent": {"canary": "2"},
    "server.max_pending_rpcs": {"server.grpc_transport": "grpcio"},
    "server.tls_cert": {"server.tls_key": "FILE"},
    "server.tls_key": {"server.tls_cert": "FILE"},
    "server.tls_ca": {"server.tls_cert": "FILE", "server.tls_key": "FILE"},
}
FILES = {"server.tls_cert", "server.tls_key", "server.tls_ca", "server.admin_token_file"}
FILES |= {"drift.token_file"}


def variable(path: str) -> str:
    return "BATCHLINE_" + path.replace(".", "__").upper()


def leaves(cls: Any, prefix: str) -> list[tuple[str, Any]]:
    """(dotted path, default) of every key below section `cls`."""
    out = []
    for name, info in cls.__pydantic_fields__.items():
        if name == "name" and cls is ModelSettings:
            continue  # the table's name, not a key
        default = info.get_default(call_default_factory=True)
        if dataclasses.is_dataclass(default):
            out += leaves(type(default), f"{prefix}{name}.")
        else:
            out.append((f"{prefix}{name}", default))
    return out


def text_for(path: str, default: Any) -> str:
    """A valid value for the key, as the environment would carry it, unlike the default."""
    for key, text in SPECIAL.items():
        if path == key or path.endswith(f".{key}"):
            return text
    if isinstance(default, bool):
        return "false" if default else "true"
    if isinstance(default, int):
        return str(default + 1)
    if isinstance(default, float):
        return str(default / 2 if default > 0 else 0.5)
    if isinstance(default, str):
        return "x"
    raise AssertionError(f"{path}: no value rule for {default!r}")


def expected(text: str, default: Any) -> Any:
    """What the key should hold after reading `text` (parsed here, not by the loader)."""
    if isinstance(default, bool):
        return text == "true"
    if isinstance(default, int):
        return int(text)
    if isinstance(default, float):
        return float(text)
    if isinstance(default, tuple):
        return tuple(json.loads(text))
    if isinstance(default, dict):
        return json.loads(text)
    return text


def read(settings: Settings, path: str) -> Any:
    section, *rest = path.split(".")
    if section in ("models", "model_defaults"):
        (value,) = settings.models
        rest = rest[1:] if section == "models" else rest
    else:
        value = getattr(settings, section)
    for part in rest:
        value = getattr(value, part)
    return value


KEYS = [
    *leaves(ServerSettings, "server."),
    *leaves(ModelDefaults, "model_defaults."),
    *leaves(ModelSettings, "models.churn."),
    *leaves(DriftSettings, "drift."),
    *leaves(TracingSettings, "tracing."),
]


def test_the_walk_covers_every_section() -> None:
    """The walk below reaches the nested sections too (a key added anywhere is covered)."""
    paths = {path for path, _ in KEYS}
    assert "server.feature_breaker.sliding_window_size" in paths
    assert "models.churn.breaker.failure_rate_threshold" in paths
    assert "models.churn.gate.min_requests" in paths
    assert "model_defaults.gate.max_error_rate" in paths
    per_section = len(dataclasses.fields(BreakerConfig)) + len(dataclasses.fields(GateConfig))
    assert len(KEYS) > 2 * per_section + 100


@pytest.mark.parametrize(("path", "default"), KEYS, ids=[k[0] for k in KEYS])
def test_every_key_can_be_set_from_the_environment(tmp_path: Path, path: str, default: Any) -> None:
    secret = tmp_path / "file"
    secret.write_text("from-a-file\n")
    text = str(secret) if path in FILES else text_for(path, default)
    env = {variable(path): text}
    for short, others in COMPANIONS.items():
        if path == short or path.endswith(f".{short}"):
            section = path[: -len(short)]
            for other, value in others.items():
                env[variable(other if "." in other else section + other)] = (
                    str(secret) if value == "FILE" else value
                )
    config = None
    if path.startswith("model_defaults."):
        config = tmp_path / "batchline.toml"
        config.write_text("[models.churn]\n")  # the defaults reach a model of the file
    settings = load_settings(config, env=env)
    assert read(settings, path) == expected(text, default), env


def test_only_the_environment_given_is_read(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """load_settings(env=...) reads that mapping alone: not os.environ, not a .env file."""
    monkeypatch.setenv("BATCHLINE_SERVER__GRPC_PORT", "9999")
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".env").write_text("BATCHLINE_SERVER__METRICS_PORT=9998\n")
    server = load_settings(env={}).server
    assert (server.grpc_port, server.metrics_port) == (8001, 8002)


# ---- the older names ------------------------------------------------------------------------

LEGACY = [
    ("BATCHLINE_HOST", "server.host", "::1", "::1"),
    ("BATCHLINE_GRPC_PORT", "server.grpc_port", "9100", 9100),
    ("BATCHLINE_HTTP_PORT", "server.http_port", "-1", -1),
    ("BATCHLINE_METRICS_PORT", "server.metrics_port", "9102", 9102),
    ("BATCHLINE_REGISTRY", "server.registry", "/srv/registry", "/srv/registry"),
    ("BATCHLINE_WORKERS", "server.workers", "3", 3),
    ("BATCHLINE_GRACE_PERIOD_S", "server.grace_period_s", "0.5", 0.5),
    ("BATCHLINE_LOG_LEVEL", "server.log_level", "error", "error"),
    ("BATCHLINE_LOG_FORMAT", "server.log_format", "text", "text"),
    ("BATCHLINE_POLL_INTERVAL_S", "server.poll_interval_s", "0", 0.0),
    ("BATCHLINE_ADMIN_TOKEN", "server.admin_token", "s3cret", "s3cret"),
    ("BATCHLINE_FEATURE_STORE", "server.feature_store", "sqlite:///f.db", "sqlite:///f.db"),
    ("BATCHLINE_DEPLOYMENT", "server.deployment", "blue", "blue"),
    ("BATCHLINE_DRIFT_TOKEN", "drift.token", "t0ken", "t0ken"),
]


@pytest.mark.parametrize(("name", "path", "text", "value"), LEGACY, ids=[x[0] for x in LEGACY])
def test_the_older_variable_names_still_set_their_key(
    name: str, path: str, text: str, value: Any
) -> None:
    assert read(load_settings(env={name: text}), path) == value


def test_the_older_file_variables_still_set_their_key(tmp_path: Path) -> None:
    secret = tmp_path / "token"
    secret.write_text("abc\n")
    env = {"BATCHLINE_ADMIN_TOKEN_FILE": str(secret), "BATCHLINE_DRIFT_TOKEN_FILE": str(secret)}
    settings = load_settings(env=env)
    assert settings.server.admin_token_file == str(secret)
    assert settings.drift.resolved_token() == "abc"


def test_the_nested_name_wins_over_the_older_one() -> None:
    env = {"BATCHLINE_GRPC_PORT": "9100", "BATCHLINE_SERVER__GRPC_PORT": "9200"}
    assert load_settings(env=env).server.grpc_port == 9200


def test_variable_names_are_read_in_any_case_and_keep_a_models_spelling(tmp_path: Path) -> None:
    config = tmp_path / "batchline.toml"
    config.write_text('[models.ChurnV2]\nref = "churn@2"\n')
    settings = load_settings(config, env={"batchline_models__churnv2__max_batch_size": "8"})
    assert [(m.name, m.max_batch_size) for m in settings.models] == [("ChurnV2", 8)]


def test_flags_override_a_nested_variable(tmp_path: Path) -> None:
    settings = load_settings(
        env={"BATCHLINE_MODELS__CHURN__MAX_BATCH_SIZE": "8", "BATCHLINE_SERVER__WORKERS": "2"},
        server_overrides={"workers": 4},
        model_overrides={"max_batch_size": 16},
    )
    assert (settings.server.workers, settings.models[0].max_batch_size) == (4, 16)


# ---- errors ---------------------------------------------------------------------------------


def test_a_bad_nested_variable_is_named_when_its_text_is_no_number() -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(env={"BATCHLINE_MODELS__CHURN__MAX_BATCH_SIZE": "many"})
    assert str(info.value) == (
        "BATCHLINE_MODELS__CHURN__MAX_BATCH_SIZE: expected an integer, got 'many'"
    )


def test_a_list_variable_that_is_not_json_is_refused_naming_it() -> None:
    with pytest.raises(ConfigError, match=r"^BATCHLINE_MODELS__CHURN__PROVIDERS: expected a list"):
        load_settings(env={"BATCHLINE_MODELS__CHURN__PROVIDERS": "CPUExecutionProvider"})


def test_an_unknown_nested_variable_is_refused_naming_the_key_and_the_variable() -> None:
    with pytest.raises(
        ConfigError, match=r"^unknown key server\.port \(from BATCHLINE_SERVER__PORT;"
    ):
        load_settings(env={"BATCHLINE_SERVER__PORT": "1"})


def test_several_errors_are_reported_together_the_first_first(tmp_path: Path) -> None:
    config = tmp_path / "batchline.toml"
    config.write_text(
        "[server]\ngrpc_port = 70000\ncolour = 1\n"
        "[models.churn]\nmax_batch_size = 0\nexecution = 'gpu'\n"
        "[models.churn.breaker]\nfailure_rate_threshold = 0\n"
        "[drift]\nsample_ratio = 2\n"
    )
    with pytest.raises(ConfigError) as info:
        load_settings(
            config, env={"BATCHLINE_TRACING__MAX_PENDING": "0"}, model_refs=("@production",)
        )
    assert info.value.problems == (
        "--model: expected NAME@ALIAS or NAME@VERSION, got '@production'",
        "server.grpc_port: expected a port 0..65535, got 70000",
        "unknown key server.colour (known: " + ", ".join(sorted(
            f.name for f in dataclasses.fields(ServerSettings)
        )) + ")",
        "models.churn.max_batch_size: expected an integer >= 1, got 0",
        "models.churn.execution: expected auto, inline or executor, got 'gpu'",
        "models.churn.breaker.failure_rate_threshold: expected a percentage in (0, 100], got 0.0",
        "drift.sample_ratio: expected a number in 0..1, got 2.0",
        "tracing.max_pending: expected an integer >= 1, got 0",
    )  # fmt: skip
    assert str(info.value).splitlines() == list(info.value.problems)


def test_checks_across_keys_of_one_section_are_reported_together(tmp_path: Path) -> None:
    config = tmp_path / "batchline.toml"
    config.write_text("[models.churn]\nref = 'churn'\nfallback = 'static'\ncanary_percent = 5\n")
    with pytest.raises(ConfigError) as info:
        load_settings(config, env={})
    assert info.value.problems == (
        "models.churn.fallback_outputs: fallback = static needs the outputs to answer",
        "models.churn.canary_percent: set models.churn.canary (a version) too",
        "models.churn.ref: expected NAME@ALIAS or NAME@VERSION, got 'churn'",
    )


def test_a_bad_default_is_reported_once_under_model_defaults(tmp_path: Path) -> None:
    config = tmp_path / "batchline.toml"
    config.write_text("[model_defaults]\ninstances = 0\n[models.a]\n[models.b]\n")
    with pytest.raises(ConfigError) as info:
        load_settings(config, env={})
    assert info.value.problems == ("model_defaults.instances: expected an integer >= 1, got 0",)


def test_a_section_built_directly_names_its_key() -> None:
    with pytest.raises(ConfigError, match=r"^tracing\.max_pending: expected an integer >= 1"):
        TracingSettings(max_pending=0)
    with pytest.raises(ConfigError, match=r"^server\.workers: "):
        dataclasses.replace(ServerSettings(), workers=0)


# ---- cost -----------------------------------------------------------------------------------


def test_reading_the_settings_imports_no_feature_library() -> None:
    """Loading the settings is cheap: no OpenTelemetry SDK, grpc, redis or ONNX Runtime."""
    code = (
        "import sys, server.config as c; c.load_settings(env={}); "
        "print(sorted({m.split('.')[0] for m in sys.modules}))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = set(json.loads(done.stdout.replace("'", '"')))
    assert loaded.isdisjoint({"opentelemetry", "grpc", "redis", "onnxruntime", "numpy"}), loaded
    assert "pydantic_settings" in loaded
