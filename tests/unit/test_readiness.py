"""The one ready-file writer: whole JSON or nothing, and no temporary file left behind."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from server.readiness import write_ready_file


def test_the_ready_file_holds_the_payload_as_json(tmp_path: Path) -> None:
    target = tmp_path / "ready.json"
    write_ready_file(target, {"grpc_port": 50123, "pid": 7})
    assert json.loads(target.read_text()) == {"grpc_port": 50123, "pid": 7}
    assert [p.name for p in tmp_path.iterdir()] == ["ready.json"]


def test_a_failed_write_leaves_neither_the_file_nor_a_temporary(tmp_path: Path) -> None:
    target = tmp_path / "ready.json"
    with pytest.raises(TypeError):
        write_ready_file(str(target), {"port": object()})  # not JSON
    assert list(tmp_path.iterdir()) == []
