"""A started server freezes what it holds (server/heap.py): a full garbage-collector pass then
walks only what was made since, not every module and model the process loaded."""

from __future__ import annotations

import gc

from tests.support.apps import AppFactory


async def test_a_started_server_freezes_its_heap_and_stop_releases_it(
    start_app: AppFactory,
) -> None:
    app = await start_app(models=("churn@production",), server={"gc_freeze": True})
    frozen = gc.get_freeze_count()
    # What a full pass would walk: the oldest generation, nearly empty after the freeze.
    assert frozen > 50_000
    assert len(gc.get_objects(generation=2)) < frozen / 10
    await app.stop(grace=1.0)
    assert gc.get_freeze_count() == 0


async def test_gc_freeze_off_leaves_the_collector_as_it_comes(start_app: AppFactory) -> None:
    gc.unfreeze()
    await start_app(models=("churn@production",), server={"gc_freeze": False})
    assert gc.get_freeze_count() == 0
    assert len(gc.get_objects(generation=2)) > 50_000
