"""Fixtures shared by every test folder."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

_FOLDER_MARKERS = ("unit", "integration", "fault", "deploy", "e2e")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test by the folder it lives in (tests/<marker>/...), so `-m unit` works."""
    root = Path(__file__).parent
    for item in items:
        folder = item.path.relative_to(root).parts[0]
        if folder not in _FOLDER_MARKERS:
            raise pytest.UsageError(
                f"{item.nodeid}: tests live in tests/<{'|'.join(_FOLDER_MARKERS)}>/"
            )
        item.add_marker(getattr(pytest.mark, folder))


@pytest.fixture(scope="session")
def demo_registry(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Root of a FileRegistry holding the demo models, built once per session (quick training).

    ``churn`` v1 (production) and v2 (candidate), ``churn_mlp`` v1 (production); each version
    carries reference.npz and holdout.npz (see ``registry_client.demo``). Read-only: tests that
    write to a registry make their own.
    """
    # The "train" extra is part of the dev install: a missing scikit-learn is an error, not a skip.
    from registry_client.demo import build_demo

    root = tmp_path_factory.mktemp("demo-registry")
    build_demo(root, quick=True)
    return root


@pytest.fixture(autouse=True)
def control_deployment(monkeypatch: pytest.MonkeyPatch) -> str:
    """A deployment name of this test's own: control state (routes, pinned refs) lives in the
    registry per deployment, and the demo registry is shared by the session, so a route one
    test sets must not reach the next test's servers (in process or spawned: the environment
    carries it)."""
    name = f"test-{uuid.uuid4().hex[:12]}"
    monkeypatch.setenv("BATCHLINE_DEPLOYMENT", name)
    return name
