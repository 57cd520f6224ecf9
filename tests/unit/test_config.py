"""load_settings: TOML file, then BATCHLINE_* environment, then flags; errors name the key."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest

from server.batching import BatchPolicy
from server.config import ModelSettings, ServerSettings, load_settings
from server.errors import ConfigError

Writer = Callable[[str], Path]


@pytest.fixture
def write(tmp_path: Path) -> Writer:
    def _write(text: str) -> Path:
        path = tmp_path / "batchline.toml"
        path.write_text(text)
        return path

    return _write


def model(settings_models: tuple[ModelSettings, ...], name: str) -> ModelSettings:
    (found,) = [m for m in settings_models if m.name == name]
    return found


# ---- sources and precedence -----------------------------------------------------------------


def test_no_file_no_env_gives_the_defaults() -> None:
    settings = load_settings(env={})
    assert settings.server == ServerSettings()
    assert settings.models == ()


def test_file_values_are_read(write: Writer) -> None:
    path = write(
        """
        [server]
        host = "127.0.0.1"
        grpc_port = 9001
        metrics_port = -1
        grace_period_s = 2.5
        log_level = "debug"

        [models.churn]
        ref = "churn@production"
        max_batch_size = 32
        max_queue_delay_us = 250
        preferred_batch_sizes = [8, 16]
        execution = "executor"
        instances = 2
        providers = ["CPUExecutionProvider"]
        """
    )
    settings = load_settings(path, env={})
    assert settings.server.host == "127.0.0.1"
    assert settings.server.grpc_port == 9001
    assert settings.server.metrics_port == -1
    assert settings.server.grace_period_s == 2.5
    assert settings.server.log_level == "debug"
    churn = model(settings.models, "churn")
    assert churn.max_batch_size == 32
    assert churn.max_queue_delay_us == 250
    assert churn.preferred_batch_sizes == (8, 16)
    assert churn.execution == "executor"
    assert churn.instances == 2
    assert churn.providers == ("CPUExecutionProvider",)


def test_env_values_are_read_and_converted() -> None:
    settings = load_settings(
        env={
            "BATCHLINE_GRPC_PORT": "9100",
            "BATCHLINE_METRICS_PORT": "-1",
            "BATCHLINE_HOST": "::1",
            "BATCHLINE_WORKERS": "3",
            "BATCHLINE_GRACE_PERIOD_S": "0.5",
            "BATCHLINE_LOG_LEVEL": "warning",
        }
    )
    server = settings.server
    assert (server.grpc_port, server.metrics_port, server.host) == (9100, -1, "::1")
    assert (server.workers, server.grace_period_s, server.log_level) == (3, 0.5, "warning")


def test_unrelated_env_variables_are_ignored() -> None:
    settings = load_settings(env={"GRPC_PORT": "1", "BATCHLINE_UNKNOWN": "x"})
    assert settings.server.grpc_port == ServerSettings().grpc_port


def test_flags_override_env_which_overrides_the_file(write: Writer) -> None:
    path = write("[server]\ngrpc_port = 9001\nmetrics_port = 9002\nhost = '10.0.0.1'\n")
    settings = load_settings(
        path,
        env={"BATCHLINE_GRPC_PORT": "9101", "BATCHLINE_METRICS_PORT": "9102"},
        server_overrides={"grpc_port": 9201, "metrics_port": None},
    )
    assert settings.server.grpc_port == 9201  # flag
    assert settings.server.metrics_port == 9102  # env (the flag was not given)
    assert settings.server.host == "10.0.0.1"  # file


def test_model_defaults_apply_to_every_model_and_a_model_overrides_them(write: Writer) -> None:
    path = write(
        """
        [model_defaults]
        max_batch_size = 32
        max_queue_delay_us = 100

        [models.churn]
        [models.churn_mlp]
        max_batch_size = 8
        """
    )
    settings = load_settings(path, env={})
    churn, mlp = model(settings.models, "churn"), model(settings.models, "churn_mlp")
    assert (churn.max_batch_size, churn.max_queue_delay_us) == (32, 100)
    assert (mlp.max_batch_size, mlp.max_queue_delay_us) == (8, 100)


def test_model_without_ref_serves_its_production_alias(write: Writer) -> None:
    settings = load_settings(write("[models.churn]\n"), env={})
    assert model(settings.models, "churn").ref == "churn@production"


def test_model_refs_add_models_and_replace_a_files_ref(write: Writer) -> None:
    path = write('[models.churn]\nref = "churn@production"\nmax_batch_size = 16\n')
    settings = load_settings(path, env={}, model_refs=("churn@candidate", "fraud@3"))
    churn, fraud = model(settings.models, "churn"), model(settings.models, "fraud")
    assert (churn.ref, churn.max_batch_size) == ("churn@candidate", 16)
    assert fraud.ref == "fraud@3"
    assert fraud.max_batch_size == ModelSettings(name="x", ref="x@1").max_batch_size


def test_model_overrides_apply_to_every_model(write: Writer) -> None:
    path = write("[models.a]\nmax_batch_size = 16\n[models.b]\n")
    settings = load_settings(path, env={}, model_overrides={"max_batch_size": 4, "instances": None})
    assert [m.max_batch_size for m in settings.models] == [4, 4]
    assert [m.instances for m in settings.models] == [1, 1]


# ---- errors name the key --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("colour = 1\n", "colour"),
        ("[server]\nport = 1\n", "server.port"),
        ("[models.churn]\nmax_batch = 1\n", "models.churn.max_batch"),
        ("[model_defaults]\ndelay = 1\n", "model_defaults.delay"),
        ("[models.churn]\nname = 'other'\n", "models.churn.name"),
    ],
    ids=["top-level", "server", "model", "model-defaults", "model-name"],
)
def test_unknown_key_is_refused_naming_the_full_key(write: Writer, text: str, key: str) -> None:
    with pytest.raises(ConfigError, match=rf"unknown key {re.escape(key)}\b"):
        load_settings(write(text), env={})


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("[models.churn]\nmax_batch_size = 'big'\n", "models.churn.max_batch_size"),
        ("[models.churn]\nmax_batch_size = true\n", "models.churn.max_batch_size"),
        ("[models.churn]\nmax_batch_size = 0\n", "models.churn.max_batch_size"),
        ("[models.churn]\ninstances = 0\n", "models.churn.instances"),
        ("[models.churn]\nmax_queue_delay_us = -1\n", "models.churn.max_queue_delay_us"),
        ("[models.churn]\nexecution = 'gpu'\n", "models.churn.execution"),
        ("[models.churn]\ndynamic_batching = 'yes'\n", "models.churn.dynamic_batching"),
        (
            "[models.churn]\npreferred_batch_sizes = [4, 'x']\n",
            "models.churn.preferred_batch_sizes",
        ),
        (
            "[models.churn]\nmax_batch_size = 8\npreferred_batch_sizes = [4, 16]\n",
            "models.churn.preferred_batch_sizes",
        ),
        ("[models.churn]\npreferred_batch_sizes = [0]\n", "models.churn.preferred_batch_sizes"),
        ("[models.churn]\nref = 'churn'\n", "models.churn.ref"),
        ("[models.churn]\nproviders = 'CPUExecutionProvider'\n", "models.churn.providers"),
        ("[model_defaults]\nmax_batch_size = 'x'\n", "model_defaults.max_batch_size"),
        ("[server]\ngrpc_port = 70000\n", "server.grpc_port"),
        ("[server]\ngrpc_port = -1\n", "server.grpc_port"),
        ("[server]\ngrpc_port = '80a'\n", "server.grpc_port"),
        ("[server]\nmetrics_port = -2\n", "server.metrics_port"),
        ("[server]\nhttp_port = 70000\n", "server.http_port"),
        ("[server]\nhttp_port = -2\n", "server.http_port"),
        ("[server]\nhttp_port = 8001\n", "server.http_port"),
        ("[server]\nworkers = 2\nhttp_port = 0\n", "server.workers"),
        ("[server]\nhttp_request_timeout_s = 0\n", "server.http_request_timeout_s"),
        ("[server]\nworkers = 0\n", "server.workers"),
        ("[server]\ngrace_period_s = -1\n", "server.grace_period_s"),
        ("[server]\ngrace_period_s = 'soon'\n", "server.grace_period_s"),
        ("[server]\nmax_message_bytes = 10\n", "server.max_message_bytes"),
        ("[server]\nmax_tensor_elements = 0\n", "server.max_tensor_elements"),
        ("[server]\nlog_level = 'loud'\n", "server.log_level"),
        ("[server]\nhost = 1\n", "server.host"),
        ("[server]\nfeature_min_keys = 0\n", "server.feature_min_keys"),
        ("[server]\nmax_pending_rpcs = -1\n", "server.max_pending_rpcs"),
        # gRPC core's queue cap, on the transport that has no gRPC core
        ("[server]\nmax_pending_rpcs = 8\n", "server.max_pending_rpcs"),
        ("[server]\ngrpc_transport = 'core'\n", "server.grpc_transport"),
        ("[server]\nfeature_max_delay_us = -1\n", "server.feature_max_delay_us"),
    ],
)
def test_bad_value_is_refused_naming_the_key(write: Writer, text: str, key: str) -> None:
    with pytest.raises(ConfigError, match=rf"^{re.escape(key)}: "):
        load_settings(write(text), env={})


# The batcher's BatchPolicy is not checked again: these are the values it could not run with.
@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("max_batch_size = 0", "max_batch_size"),
        ("max_queue_delay_us = -1", "max_queue_delay_us"),
        ("max_batch_size = 8\npreferred_batch_sizes = [9]", "preferred_batch_sizes"),
        ("max_batch_size = 8\npreferred_batch_sizes = [0]", "preferred_batch_sizes"),
        ("instances = 0", "instances"),
        ("max_queue_size = -1", "max_queue_size"),
    ],
    ids=[
        "batch-0",
        "negative-delay",
        "preferred-above-max",
        "preferred-0",
        "instances-0",
        "queue",
    ],
)
def test_a_batch_policy_the_batcher_cannot_run_is_refused_naming_the_key(
    write: Writer, text: str, key: str
) -> None:
    with pytest.raises(ConfigError, match=rf"^models\.churn\.{key}: "):
        load_settings(write(f"[models.churn]\n{text}\n"), env={})


def test_the_batchers_section_takes_the_edge_values_in_its_own_units(write: Writer) -> None:
    text = (
        "[models.churn]\nmax_batch_size = 1\nmax_queue_delay_us = 0\n"
        "preferred_batch_sizes = [1]\nmax_queue_size = 0\ndynamic_batching = false\n"
        "[models.fraud]\nmax_queue_delay_us = 2500\n"
    )
    churn, fraud = load_settings(write(text), env={}).models
    assert churn.batching == BatchPolicy(
        max_batch_size=1,
        max_queue_delay_s=0.0,
        preferred_batch_sizes=(1,),
        max_queue_size=None,  # 0 in the file: no bound
        instances=1,
        enabled=False,
    )
    assert fraud.batching.max_queue_delay_s == 0.0025


def test_model_range_error_says_what_was_expected_and_got(write: Writer) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(write("[models.churn]\nmax_batch_size = 0\n"), env={})
    assert str(info.value) == "models.churn.max_batch_size: expected an integer >= 1, got 0"


@pytest.mark.parametrize("value", ["nine", "--5", "²", "1.5", ""])
def test_bad_env_integer_is_refused_naming_the_variable(value: str) -> None:
    with pytest.raises(ConfigError, match=r"^BATCHLINE_GRPC_PORT: "):
        load_settings(env={"BATCHLINE_GRPC_PORT": value})


def test_env_out_of_range_port_is_refused_naming_the_setting() -> None:
    with pytest.raises(ConfigError, match=r"^server\.grpc_port: "):
        load_settings(env={"BATCHLINE_GRPC_PORT": "70000"})


def test_bad_model_ref_flag_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"^--model: "):
        load_settings(env={}, model_refs=("@production",))


def test_bad_flag_value_names_the_flag() -> None:
    with pytest.raises(ConfigError, match=r"^--max-batch-size: "):
        load_settings(env={}, model_refs=("churn@1",), model_overrides={"max_batch_size": "many"})


def test_boolean_for_a_number_is_refused(write: Writer) -> None:
    with pytest.raises(ConfigError, match=r"^server\.grace_period_s: "):
        load_settings(write("[server]\ngrace_period_s = true\n"), env={})


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("server = 3\n", "server"),
        ("model_defaults = 'x'\n", "model_defaults"),
        ("models = [1]\n", "models"),
    ],
    ids=["server", "model_defaults", "models"],
)
def test_section_that_is_not_a_table_is_refused_naming_it(
    write: Writer, text: str, key: str
) -> None:
    with pytest.raises(ConfigError, match=rf"^{re.escape(key)}\b"):
        load_settings(write(text), env={})


def test_model_entry_that_is_not_a_table_is_refused_naming_it(write: Writer) -> None:
    with pytest.raises(ConfigError, match=r"^models\.churn: expected a table"):
        load_settings(write("[models]\nchurn = 1\n"), env={})


def test_several_workers_on_an_ephemeral_port_are_refused() -> None:
    with pytest.raises(ConfigError, match=r"^server\.workers: "):
        load_settings(env={"BATCHLINE_WORKERS": "2", "BATCHLINE_GRPC_PORT": "0"})


def test_one_worker_on_an_ephemeral_port_is_allowed() -> None:
    assert load_settings(env={"BATCHLINE_GRPC_PORT": "0"}).server.grpc_port == 0


def test_invalid_toml_is_refused_naming_the_file(write: Writer) -> None:
    path = write("[server\ngrpc_port = 1\n")
    with pytest.raises(ConfigError, match="is not valid TOML") as info:
        load_settings(path, env={})
    assert str(path) in str(info.value)


def test_missing_file_is_refused_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "absent.toml"
    with pytest.raises(ConfigError, match="does not exist") as info:
        load_settings(path, env={})
    assert str(path) in str(info.value)


def test_drift_token_comes_from_the_environment_and_replaces_a_configured_file(
    write: Writer, tmp_path: Path
) -> None:
    token_file = tmp_path / "drift-token"
    token_file.write_text("from-file\n")
    path = write(f'[drift]\ntoken_file = "{token_file}"\n')
    assert load_settings(path).drift.resolved_token() == "from-file"
    drift = load_settings(path, env={"BATCHLINE_DRIFT_TOKEN": "from-env"}).drift
    assert (drift.token, drift.token_file, drift.resolved_token()) == ("from-env", "", "from-env")
    assert load_settings(path, env={"BATCHLINE_DRIFT_TOKEN": ""}).drift.token == ""


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('token_file = "/nonexistent/drift-token"', r"drift\.token_file: cannot read"),
        ('token = "a"\ntoken_file = "/etc/hostname"', r"drift\.token_file: give the drift token"),
        ("max_queue_bytes = 0", r"drift\.max_queue_bytes: expected an integer >= 1"),
        ("warn_after_s = 0", r"drift\.warn_after_s: expected a number > 0"),
        ("label_memory_bytes = -1", r"drift\.label_memory_bytes"),
    ],
)
def test_bad_drift_trust_settings_name_the_key(write: Writer, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_settings(write(f"[drift]\n{text}\n"))


def test_an_empty_drift_token_file_is_refused(write: Writer, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.write_text("\n")
    with pytest.raises(ConfigError, match=r"drift\.token_file: .* is empty"):
        load_settings(write(f'[drift]\ntoken_file = "{empty}"\n'))


def test_shadow_pair_memory_bound_must_be_positive(write: Writer) -> None:
    with pytest.raises(ConfigError, match=r"server\.shadow_log_max_memory_bytes"):
        load_settings(write("[server]\nshadow_log_max_memory_bytes = 0\n"))
