"""Log lines as text for a person at a terminal, JSON lines for machines."""

from __future__ import annotations

import io
import json
import logging

import pytest

from server.config import ConfigError, load_settings
from server.observability.logging import configure


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def _restore_root() -> object:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def _emit(stream: io.StringIO, monkeypatch: pytest.MonkeyPatch, fmt: str) -> str:
    monkeypatch.setattr("sys.stderr", stream)
    configure("info", fmt)
    logging.getLogger("server.app").info(
        "swapped %s", "churn", extra={"model": "churn", "version": "2"}
    )
    return stream.getvalue()


def test_auto_is_json_off_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    entry = json.loads(_emit(io.StringIO(), monkeypatch, "auto"))
    assert (entry["message"], entry["model"], entry["level"]) == ("swapped churn", "churn", "info")


def test_auto_is_text_on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    line = _emit(_Tty(), monkeypatch, "auto").strip()
    assert line.endswith("INFO  server.app: swapped churn [model=churn version=2]")


def test_json_forced_on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    assert json.loads(_emit(_Tty(), monkeypatch, "json"))["version"] == "2"


def test_a_bad_log_format_is_a_config_error_naming_the_key() -> None:
    with pytest.raises(ConfigError, match=r"server\.log_format"):
        load_settings(None, server_overrides={"log_format": "xml"}, model_refs=("churn@1",))
