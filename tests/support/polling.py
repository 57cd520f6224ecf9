"""`eventually()`: wait for state the test can observe, with a real deadline.

Synchronisation by observing state, not a sleep standing in for it: the check runs at once,
then every `every` seconds until it holds or `timeout` passes, which fails the test saying
what did not happen (and, with `detail`, what was seen instead).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

Check = Callable[[], bool | Awaitable[bool]]
T = TypeVar("T")


async def eventually(
    check: Check,
    *,
    timeout: float,  # noqa: ASYNC109 - the poll's deadline: a failure saying what, not a cancel
    what: str,
    every: float = 0.02,
    detail: Callable[[], object] | None = None,
) -> float:
    """Poll `check` (sync or async) until it holds; the seconds it took. AssertionError after
    `timeout` seconds."""
    start = time.monotonic()
    while True:
        held = check()
        if not isinstance(held, bool):
            held = await held
        if held:
            return time.monotonic() - start
        if time.monotonic() - start >= timeout:
            seen = f": {detail()}" if detail is not None else ""
            raise AssertionError(f"{what} did not happen within {timeout}s{seen}")
        await asyncio.sleep(every)  # poll interval of a bounded condition loop


def eventually_blocking(
    check: Callable[[], bool],
    *,
    timeout: float,
    what: str,
    every: float = 0.02,
    detail: Callable[[], object] | None = None,
) -> float:
    """`eventually` for code with no event loop (sync tests, threads)."""
    start = time.monotonic()
    while not check():
        if time.monotonic() - start >= timeout:
            seen = f": {detail()}" if detail is not None else ""
            raise AssertionError(f"{what} did not happen within {timeout}s{seen}")
        time.sleep(every)  # poll interval of a bounded condition loop
    return time.monotonic() - start


def settled(read: Callable[[], T], *, timeout: float = 5.0, every: float = 0.05) -> T:
    """`read()` once two reads `every` seconds apart agree (counters still moving after a
    client exits), or the last read after `timeout`."""
    deadline = time.monotonic() + timeout
    last = read()
    while True:
        time.sleep(every)  # the interval between the two reads that must agree
        now = read()
        if now == last or time.monotonic() > deadline:
            return now
        last = now
