"""server/heap.py: what settle() freezes is skipped by later collections until the next settle,
which collects it if it became garbage (a retired model version's cycles are not leaked)."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from server import heap


class _Node:
    def __init__(self) -> None:
        self.other: _Node | None = None


def _cycle() -> weakref.ref[_Node]:
    a, b = _Node(), _Node()
    a.other, b.other = b, a
    return weakref.ref(a)


@pytest.fixture(autouse=True)
def unfrozen() -> Iterator[None]:
    yield
    gc.unfreeze()


def test_settle_freezes_the_survivors_and_later_collections_skip_them() -> None:
    a, b = _Node(), _Node()
    a.other, b.other = b, a
    alive = weakref.ref(a)
    heap.settle()
    assert gc.get_freeze_count() > 0
    del a, b  # garbage now, but frozen: a collection does not walk it
    gc.collect()
    assert alive() is not None


def test_the_next_settle_collects_what_became_garbage_since() -> None:
    a, b = _Node(), _Node()
    a.other, b.other = b, a
    alive = weakref.ref(a)
    heap.settle()
    del a, b
    heap.settle()
    assert alive() is None
    assert gc.get_freeze_count() > 0


def test_garbage_made_before_a_settle_is_collected_not_frozen() -> None:
    dead = _cycle()
    heap.settle()
    assert dead() is None


def test_release_undoes_a_freeze() -> None:
    heap.settle()
    assert gc.get_freeze_count() > 0
    heap.release()
    assert gc.get_freeze_count() == 0
