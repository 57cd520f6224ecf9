"""End-to-end fixtures: Triton's real perf_analyzer binary, installed by the project itself."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.processes import ROOT, ServerProcess, serving

INSTALL_SCRIPT = ROOT / "scripts" / "install_perf_analyzer.sh"
INSTALL_DIR = ROOT / ".tools" / "perf_analyzer"


@pytest.fixture(scope="session")
def perf_analyzer() -> Path:
    """Path of the perf_analyzer wrapper (`.tools/perf_analyzer/run`), installing it if needed.

    A failed install raises, so the tests that need it ERROR instead of skipping: the
    acceptance client must be there on every machine that runs the suite.
    """
    env = {**os.environ, "PYTHON": sys.executable}
    result = subprocess.run(
        ["bash", str(INSTALL_SCRIPT), str(INSTALL_DIR)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(
            f"{INSTALL_SCRIPT.relative_to(ROOT)} failed with exit code {result.returncode}:\n"
            f"{result.stdout}\n{result.stderr}"
        )
    return INSTALL_DIR / "run"


@pytest.fixture(scope="module")
def batchline_server(
    demo_registry: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    """A `batchline serve` subprocess with churn@production and churn_mlp@production, owned by
    one test module so that statistics deltas are not disturbed by other tests' traffic."""
    with serving(demo_registry, tmp_path_factory.mktemp("e2e-server")) as server:
        yield server
