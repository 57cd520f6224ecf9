"""The `batchline` command as a user runs it: a subprocess, its exit status and what it says.

Every mistake a user can make gets one line on stderr naming the flag, file or URL and what to
do, and a non-zero exit; none prints a traceback unless `--debug` asks for it. Models exported
the way users export them (skl2onnx's defaults) register and serve.
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from registry_client import FileRegistry
from server._proto import inference_pb2_grpc as pb_grpc
from tests.support.apps import AppFactory
from tests.support.processes import ROOT, ServerProcess
from tests.support.requests import infer_request

BATCHLINE = str(Path(sys.executable).with_name("batchline"))
FEATURES = [f"f{i}" for i in range(15)]


def clean_env(**extra: str) -> dict[str, str]:
    """The environment without BATCHLINE_* settings of whoever runs the tests, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BATCHLINE_")}
    return {**env, **extra}


def batchline(
    *args: str, env: dict[str, str] | None = None, timeout: float = 120.0
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [BATCHLINE, *args],
        cwd=ROOT,
        env=env or clean_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def one_line_error(done: subprocess.CompletedProcess[str], code: int = 2) -> str:
    """The command failed with `code` and said so in one line, without a traceback."""
    assert done.returncode == code, (done.returncode, done.stdout, done.stderr)
    assert "Traceback" not in done.stderr, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    return lines[0]


# ---- help -----------------------------------------------------------------------------------


def test_top_level_help_describes_batchline() -> None:
    done = batchline("--help")
    assert done.returncode == 0
    description = done.stdout.split("\n\n")[1]
    assert description.startswith("batchline serves ONNX models over gRPC")
    assert "Open Inference Protocol" in description
    assert "argv ->" not in done.stdout
    assert "batchline registry register churn model.onnx" in done.stdout
    for command in ("serve", "registry", "admin", "features", "health"):
        assert f"    {command} " in done.stdout


# ---- models as users export them ------------------------------------------------------------


def export_classifier(path: Path, *, batch: int | None = None) -> Any:
    """A LogisticRegression on 8 features, exported with skl2onnx's defaults (ZipMap)."""
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(3)
    X = rng.normal(size=(400, 8)).astype(np.float32)
    y = (X[:, 1] - X[:, 5] > 0.2).astype(np.int64)
    clf = LogisticRegression().fit(X, y)
    onx = convert_sklearn(clf, initial_types=[("input", FloatTensorType([batch, 8]))])
    path.write_bytes(onx.SerializeToString())
    return clf


async def test_a_default_skl2onnx_classifier_registers_and_serves_its_probabilities(
    start_app: AppFactory, tmp_path: Path
) -> None:
    registry = tmp_path / "registry"
    exported = tmp_path / "model.onnx"
    clf = export_classifier(exported)
    done = batchline(
        "registry", "register", "clf", str(exported), "--registry", str(registry),
        "--alias", "production", "--features", ",".join(f"x{i}" for i in range(8)),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "unwrapped skl2onnx's ZipMap into FP32 [-1, 2]" in done.stdout
    assert f"serve it: batchline serve --registry {registry} --model clf@production" in (
        done.stdout
    )
    app = await start_app(models=("clf@production",), registry=registry)
    X = np.random.default_rng(5).normal(size=(16, 8)).astype(np.float32)
    request = infer_request(X, "clf")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as channel:
        reply = await pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=30)
    outputs = {
        o.name: (o, raw) for o, raw in zip(reply.outputs, reply.raw_output_contents, strict=True)
    }
    label, label_raw = outputs["output_label"]
    proba, proba_raw = outputs["output_probability"]
    assert (label.datatype, list(label.shape)) == ("INT64", [16])
    assert (proba.datatype, list(proba.shape)) == ("FP32", [16, 2])
    np.testing.assert_array_equal(np.frombuffer(label_raw, np.int64), clf.predict(X))
    np.testing.assert_allclose(
        np.frombuffer(proba_raw, np.float32).reshape(16, 2), clf.predict_proba(X), atol=1e-5
    )


def test_a_fixed_batch_dimension_is_refused_when_registered(tmp_path: Path) -> None:
    registry = tmp_path / "registry"
    exported = tmp_path / "fixed.onnx"
    export_classifier(exported, batch=1)
    line = one_line_error(
        batchline("registry", "register", "clf", str(exported), "--registry", str(registry)), 1
    )
    assert str(exported) in line
    assert "input 'input' has a fixed first dimension of 1 ([1, 8])" in line
    assert "FloatTensorType([None, ...])" in line
    assert not registry.exists() or FileRegistry(registry).list_models() == []


def test_features_that_do_not_match_the_inputs_are_refused(tmp_path: Path) -> None:
    exported = tmp_path / "model.onnx"
    export_classifier(exported)
    registry = tmp_path / "registry"
    line = one_line_error(
        batchline(
            "registry",
            "register",
            "clf",
            str(exported),
            "--registry",
            str(registry),
            "--features",
            "a,b,c",
        ),
        1,
    )
    assert "--features: 3 names (a, b, c)" in line
    assert "input 'input' FP32 [-1, 8] takes 8 features" in line


def test_register_without_an_alias_says_how_to_make_it_servable(tmp_path: Path) -> None:
    exported = tmp_path / "model.onnx"
    export_classifier(exported)
    registry = str(tmp_path / "registry")
    done = batchline("registry", "register", "clf", str(exported), "--registry", registry)
    assert done.returncode == 0, done.stderr
    assert "not served yet: no alias points at clf yet" in done.stdout
    assert f"batchline registry promote clf 1 --registry {registry}" in done.stdout
    done = batchline("registry", "promote", "clf", "1", "--registry", registry)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("clf@production: - -> 1\n")


def test_registry_commands_honour_batchline_registry_and_refuse_a_missing_folder(
    demo_registry: Path, tmp_path: Path
) -> None:
    line = one_line_error(batchline("registry", "list", "--registry", "nosuchdir"), 1)
    assert "--registry nosuchdir: no such folder" in line
    line = one_line_error(batchline("registry", "list"), 1)
    assert "set BATCHLINE_REGISTRY" in line
    done = batchline("registry", "list", env=clean_env(BATCHLINE_REGISTRY=str(demo_registry)))
    assert done.returncode == 0, done.stderr
    assert [row.split()[0] for row in done.stdout.splitlines()] == ["MODEL", "churn", "churn_mlp"]
    gone = str(tmp_path / "gone")
    done = batchline("registry", "show", "churn", env=clean_env(BATCHLINE_REGISTRY=gone))
    line = one_line_error(done, 1)
    assert f"BATCHLINE_REGISTRY={gone}: no such folder" in line


# ---- serve ----------------------------------------------------------------------------------


def test_the_same_model_twice_is_refused_naming_both_refs(demo_registry: Path) -> None:
    line = one_line_error(
        batchline(
            "serve",
            "--registry",
            str(demo_registry),
            "--grpc-port",
            "0",
            "--metrics-port",
            "-1",
            "--model",
            "churn@production",
            "--model",
            "churn@2",
        )
    )
    assert "--model churn@production and --model churn@2 both serve model 'churn'" in line
    assert "--canary" in line


def test_serve_from_a_missing_registry_folder_is_refused(tmp_path: Path) -> None:
    line = one_line_error(
        batchline("serve", "--registry", str(tmp_path / "nope"), "--model", "churn@production")
    )
    assert f"--registry {tmp_path / 'nope'}: no such folder" in line


@pytest.fixture
def held_port() -> Iterator[int]:
    """A loopback port another process-like listener holds for the test."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield holder.getsockname()[1]


@pytest.mark.parametrize("flag", ["--grpc-port", "--http-port", "--metrics-port"])
def test_a_port_in_use_names_the_port_and_its_flag(
    demo_registry: Path, held_port: int, flag: str
) -> None:
    ports = {"--grpc-port": "0", "--metrics-port": "-1", flag: str(held_port)}
    done = batchline(
        "serve", "--registry", str(demo_registry), "--model", "churn@production",
        "--host", "127.0.0.1", *(x for item in ports.items() for x in item),
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"batchline: {flag} {held_port}: cannot listen on 127.0.0.1:")
    assert "Address already in use" in last
    assert "choose another port" in last


@pytest.mark.parametrize("flag", ["--grpc-port", "--http-port"])
def test_the_drift_sidecar_names_its_port_in_use(
    demo_registry: Path, held_port: int, flag: str
) -> None:
    """The HTTP port fails after the gRPC server started: that one is stopped first, so no
    teardown traceback follows the line."""
    ports = {"--grpc-port": "0", "--http-port": "0", flag: str(held_port)}
    done = batchline(
        "drift", "--registry", str(demo_registry), "--host", "127.0.0.1",
        *(part for item in ports.items() for part in item),
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert "Event loop is closed" not in done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"batchline: {flag} {held_port}: cannot listen on 127.0.0.1:")
    assert "Address already in use" in last


# ---- errors, --debug, pipes -----------------------------------------------------------------


def test_a_user_mistake_is_one_line_and_debug_shows_the_traceback(
    demo_registry: Path, tmp_path: Path
) -> None:
    args = (
        "features", "materialize", "--registry", str(demo_registry),
        "--model", "churn@production", "--input", str(tmp_path / "missing.csv"),
        "--store", f"sqlite:///{tmp_path / 'f.db'}",
    )  # fmt: skip
    line = one_line_error(batchline(*args))
    assert line == f"batchline: --input {tmp_path / 'missing.csv'}: no such file"
    debug = batchline(*args, "--debug")
    assert debug.returncode == 2
    assert "Traceback (most recent call last)" in debug.stderr
    assert debug.stderr.strip().splitlines()[-1] == line


def test_a_closed_pipe_ends_quietly(demo_registry: Path) -> None:
    # The reader is gone before batchline writes a byte: `batchline ... | head -0`, for sure.
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        done = subprocess.run(
            [BATCHLINE, "registry", "show", "churn", "--registry", str(demo_registry)],
            cwd=ROOT,
            env=clean_env(),
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=120,
        )
    finally:
        os.close(write_end)
    assert done.stderr == ""
    assert done.returncode == 141


def test_health_names_a_service_the_server_does_not_have(server_process: ServerProcess) -> None:
    line = one_line_error(
        batchline("health", "--address", server_process.address, "--service", "churn"), 1
    )
    assert f"--service 'churn': {server_process.address} has no such health service" in line
    assert "'inference.GRPCInferenceService'" in line
    assert f"batchline admin status churn --address {server_process.address}" in line
    done = batchline("health", "--address", server_process.address)
    assert (done.returncode, done.stdout) == (0, "SERVING\n")


def _without(modules: tuple[str, ...], *argv: str) -> subprocess.CompletedProcess[str]:
    """`batchline ARGV` in an interpreter where `modules` cannot be imported."""
    code = (
        "import sys\n"
        f"for name in {modules!r}: sys.modules[name] = None\n"
        "from server.cli import main\n"
        f"sys.exit(main({list(argv)!r}))\n"
    )
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_build_demo_without_the_train_extra_says_how_to_install_it(tmp_path: Path) -> None:
    done = _without(("sklearn", "skl2onnx"), "models", "build-demo", "--registry", str(tmp_path))
    line = one_line_error(done)
    assert "needs sklearn (the 'train' extra): pip install 'batchline[train]'" in line


def test_register_without_onnx_says_how_to_install_it(tmp_path: Path) -> None:
    exported = tmp_path / "model.onnx"
    export_classifier(exported)
    done = _without(
        ("onnx",), "registry", "register", "clf", str(exported), "--registry", str(tmp_path / "r")
    )
    assert "pip install 'batchline[train]'" in one_line_error(done, 1)


# ---- features materialize -------------------------------------------------------------------


def _table(path: Path, header: list[str], rows: int = 3) -> Path:
    lines = [",".join(header)]
    for r in range(rows):
        lines.append(",".join(f"c{r}" if h == "id" else str(r + j) for j, h in enumerate(header)))
    path.write_text("\n".join(lines) + "\n")
    return path


def _materialize(
    registry: Path, table: Path, store: str, *extra: str
) -> subprocess.CompletedProcess[str]:
    return batchline(
        "features", "materialize", "--registry", str(registry), "--model", "churn@production",
        "--input", str(table), "--store", store, *extra,
    )  # fmt: skip


def test_materialize_refuses_a_table_without_the_entity_key(
    demo_registry: Path, tmp_path: Path
) -> None:
    table = _table(tmp_path / "t.csv", ["id", *FEATURES])
    db = tmp_path / "f.db"
    line = one_line_error(_materialize(demo_registry, table, f"sqlite:///{db}"))
    assert f"--input {table}: no 'customer_id' column" in line
    assert "columns found: id, f0, f1" in line
    assert not db.exists()  # refused before the store was opened


def test_materialize_refuses_a_table_missing_feature_columns(
    demo_registry: Path, tmp_path: Path
) -> None:
    table = _table(tmp_path / "t.csv", ["customer_id", *FEATURES[:12]])
    db = tmp_path / "f.db"
    line = one_line_error(_materialize(demo_registry, table, f"sqlite:///{db}"))
    assert "3 of the 15 features of view churn_customer have no column: f12, f13, f14" in line
    assert "columns found: customer_id, f0" in line
    assert not db.exists()


@pytest.mark.parametrize(
    ("name", "text"), [("empty.json", "[]\n"), ("empty.csv", "customer_id," + ",".join(FEATURES))]
)
def test_materialize_refuses_a_table_with_no_rows(
    demo_registry: Path, tmp_path: Path, name: str, text: str
) -> None:
    table = tmp_path / name
    table.write_text(text)
    line = one_line_error(_materialize(demo_registry, table, f"sqlite:///{tmp_path / 'f.db'}"))
    assert f"--input {table}: no rows" in line


def test_materialize_reads_json_lines(demo_registry: Path, tmp_path: Path) -> None:
    table = tmp_path / "rows.jsonl"
    rows = [
        {"customer_id": f"j{i}", **{f: i + j / 10 for j, f in enumerate(FEATURES)}}
        for i in range(4)
    ]
    table.write_text("".join(json.dumps(r) + "\n" for r in rows))
    db = tmp_path / "f.db"
    done = _materialize(demo_registry, table, f"sqlite:///{db}")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("materialized 4 customer_id rows of churn_customer into")
    with sqlite3.connect(db) as conn:
        (count,) = conn.execute("SELECT COUNT(*) FROM features").fetchone()
    assert count == 4


@pytest.mark.parametrize(
    ("store", "expected"),
    [
        (
            "sqlite://rel.db",
            "a SQLite store is sqlite:///PATH, with three slashes: sqlite:///rel.db",
        ),
        ("postgres://db/features", "postgres:// is not a feature store batchline can use"),
        ("features.db", "not a URL; expected redis://HOST:PORT/DB"),
    ],
)
def test_materialize_names_a_store_url_it_cannot_use(
    demo_registry: Path, tmp_path: Path, store: str, expected: str
) -> None:
    table = _table(tmp_path / "t.csv", ["customer_id", *FEATURES])
    line = one_line_error(_materialize(demo_registry, table, store))
    assert line.startswith(f"batchline: --store {store}: ")
    assert expected in line


def test_materialize_names_a_redis_it_cannot_reach(demo_registry: Path, tmp_path: Path) -> None:
    with socket.socket() as probe:  # a port nothing listens on once closed
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    table = _table(tmp_path / "t.csv", ["customer_id", *FEATURES])
    line = one_line_error(_materialize(demo_registry, table, f"redis://127.0.0.1:{port}/0"))
    assert f"--store redis://127.0.0.1:{port}/0: cannot reach it" in line
