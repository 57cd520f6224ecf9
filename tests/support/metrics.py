"""The server's own view: its /metrics endpoint parsed by prometheus_client (bench/scrape.py,
shared with the benches)."""

from __future__ import annotations

import asyncio

from bench.scrape import Labels, Samples, metric, parse, scrape, totals

__all__ = ["Labels", "Samples", "metric", "parse", "scrape", "scrape_async", "totals"]


async def scrape_async(port: int) -> Samples:
    """`scrape` from a thread, so the loop an in-process server runs on keeps serving."""
    return await asyncio.to_thread(scrape, port)
