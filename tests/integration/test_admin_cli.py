"""`batchline admin status | reload | route get | set` against a real `batchline serve`, run as a
user runs them (subprocesses), with the token from the environment or a file, and without one.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from registry_client import FileRegistry
from tests.integration.test_cli_usability import batchline, clean_env, one_line_error
from tests.support.processes import ServerProcess, spawn_server

TOKEN = "admin-cli-t0ken"


@pytest.fixture
def registry(demo_registry: Path, tmp_path: Path) -> Path:
    """A copy of the demo registry this test may promote in."""
    copy = tmp_path / "registry"
    shutil.copytree(demo_registry, copy)
    return copy


@pytest.fixture
def config(tmp_path: Path) -> Path:
    # No alias polling: a version changes only when the test reloads it.
    path = tmp_path / "batchline.toml"
    path.write_text("[server]\npoll_interval_s = 0\n")
    return path


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "admin-token"
    path.write_text(TOKEN + "\n")
    return path


@pytest.fixture
def guarded(
    registry: Path, config: Path, token_file: Path, tmp_path: Path
) -> Iterator[ServerProcess]:
    """A server whose admin RPCs need TOKEN."""
    server = spawn_server(
        registry, tmp_path, "--config", str(config), "--admin-token-file", str(token_file),
        "--model", "churn@production",
    )  # fmt: skip
    yield server
    assert server.terminate() == 0, server.log.read_text()


def admin(
    server: ServerProcess, *args: str, token: str | None = TOKEN, **env: str
) -> tuple[int, str, str]:
    extra = {"BATCHLINE_ADMIN_TOKEN": token} if token is not None else {}
    done = batchline("admin", *args, "--address", server.address, env=clean_env(**extra, **env))
    return done.returncode, done.stdout, done.stderr


def test_the_token_comes_from_the_environment_or_a_file(
    guarded: ServerProcess, token_file: Path, tmp_path: Path
) -> None:
    code, out, err = admin(guarded, "status", token=None)
    assert (code, out) == (1, "")
    assert err.strip() == (
        f"batchline admin status: {guarded.address} needs an admin token (UNAUTHENTICATED): "
        "set BATCHLINE_ADMIN_TOKEN or pass --token-file FILE"
    )
    code, _, err = admin(guarded, "status", token="wrong")
    assert code == 1
    assert "refused the admin token from BATCHLINE_ADMIN_TOKEN" in err
    assert admin(guarded, "status")[0] == 0
    assert admin(guarded, "status", "--token-file", str(token_file), token=None)[0] == 0
    ok = admin(guarded, "status", token=None, BATCHLINE_ADMIN_TOKEN_FILE=str(token_file))
    assert ok[0] == 0, ok[2]
    missing = tmp_path / "no-token"
    done = batchline("admin", "status", "--address", guarded.address, "--token-file", str(missing))
    line = one_line_error(done, 2)
    assert f"--token-file {missing}: cannot read it: No such file or directory" in line


def test_status_shows_the_served_version_for_people_and_as_json(
    guarded: ServerProcess, registry: Path
) -> None:
    artifact = registry / "churn" / "1" / "model.onnx"
    sha256 = hashlib.sha256(artifact.read_bytes()).hexdigest()
    code, out, err = admin(guarded, "status")
    assert code == 0, err
    header, row = out.splitlines()
    assert header.split() == [
        "MODEL", "VERSION", "ALIAS", "STATE", "EXECUTION", "RELOADS", "FAILED", "LOADED", "SHA256"
    ]  # fmt: skip
    cells = row.split()
    assert cells[:4] == ["churn", "1", "production", "READY"]
    assert cells[-1] == sha256[:12]
    code, out, err = admin(guarded, "status", "churn", "--json")
    assert code == 0, err
    (state,) = json.loads(out)
    assert (state["name"], state["version"], state["alias"], state["sha256"]) == (
        "churn", "1", "production", sha256
    )  # fmt: skip
    assert state["ref"] == "churn@production"
    assert state["reloads"] == 0
    code, _, err = admin(guarded, "status", "fraud")
    assert code == 1
    assert "NOT_FOUND: unknown model 'fraud' (served: churn)" in err


def test_reload_swaps_to_the_version_the_alias_was_promoted_to(
    guarded: ServerProcess, registry: Path
) -> None:
    assert admin(guarded, "reload", "churn")[1] == "churn: version 1, unchanged\n"
    promoted = batchline("registry", "promote", "churn", "2", "--registry", str(registry))
    assert promoted.returncode == 0, promoted.stderr
    assert "batchline admin reload churn" in promoted.stdout
    code, out, err = admin(guarded, "reload", "churn", "--json")
    assert code == 0, err
    assert json.loads(out) == {
        "model": "churn", "version": "2", "previous_version": "1", "changed": True,
        "message": "swapped",
    }  # fmt: skip
    code, out, _ = admin(guarded, "status", "churn", "--json")
    assert json.loads(out)[0]["version"] == "2"
    assert FileRegistry(registry).aliases("churn")["production"] == "2"
    code, out, err = admin(guarded, "reload", "churn", "--ref", "churn@1")
    assert (code, out) == (0, "churn: version 2 -> 1\n"), err
    code, _, err = admin(guarded, "reload", "churn", "--ref", "churn_mlp@1")
    assert code == 1
    assert "INVALID_ARGUMENT" in err
    assert "names registry model 'churn_mlp'" in err


def test_route_get_and_set(guarded: ServerProcess) -> None:
    code, out, err = admin(guarded, "route", "get", "churn")
    assert (code, out) == (0, "churn: primary 1, canary -, shadows -\n"), err
    code, out, err = admin(
        guarded, "route", "set", "churn", "--canary", "2", "--canary-percent", "25"
    )
    assert code == 0, err
    assert out.splitlines() == [
        "was churn: primary 1, canary -, shadows -",
        "now churn: primary 1, canary 2 (25%), shadows -",
    ]
    code, out, err = admin(guarded, "route", "get", "churn", "--json")
    assert json.loads(out) == {
        "model": "churn", "primary": "1", "canary": "2", "canary_percent": 25.0, "shadows": [],
    }  # fmt: skip
    code, out, err = admin(guarded, "route", "set", "churn", "--shadow", "2:50")
    assert code == 0, err
    assert out.splitlines()[1] == "now churn: primary 1, canary -, shadows 2 (50%)"
    code, _, err = admin(guarded, "route", "set", "churn", "--canary", "9", "--canary-percent", "5")
    assert code == 1
    assert "FAILED_PRECONDITION" in err
    assert "no version '9'" in err
    code, _, err = admin(guarded, "route", "set", "churn", "--canary-percent", "5")
    assert code == 2
    assert "--canary-percent: give the canary version too (--canary VERSION)" in err
    # Nothing was changed by the refused calls.
    assert admin(guarded, "route", "get", "churn")[1] == (
        "churn: primary 1, canary -, shadows 2 (50%)\n"
    )


def test_a_loopback_server_without_a_token_needs_none(
    registry: Path, config: Path, tmp_path: Path
) -> None:
    server = spawn_server(
        registry, tmp_path, "--config", str(config), "--model", "churn@production"
    )
    try:
        code, out, err = admin(server, "status", token=None)
        assert code == 0, err
        assert out.splitlines()[1].split()[:2] == ["churn", "1"]
    finally:
        assert server.terminate() == 0


def test_an_unreachable_server_is_named() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{probe.getsockname()[1]}"
    line = one_line_error(batchline("admin", "status", "--address", address, "--timeout", "20"), 1)
    assert line.startswith(f"batchline admin status: cannot reach {address} (--address)")
