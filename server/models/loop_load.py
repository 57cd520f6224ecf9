"""How busy the event loop's thread is (the shadow mirror's "no spare CPU" signal)."""

from __future__ import annotations

import asyncio
import time


class LoopLoad:
    """How busy the event loop's thread is: its CPU time over wall time, sampled every
    `period_s` on the loop itself, as a moving average (the mirror's "no spare CPU" signal;
    loop lag barely moves on a saturated loop of many short callbacks)."""

    def __init__(self, period_s: float = 0.05) -> None:
        self._period = period_s
        self.busy = 0.0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._probe())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    async def _probe(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            wall, cpu = loop.time(), time.thread_time()
            await asyncio.sleep(self._period)
            elapsed = loop.time() - wall
            if elapsed > 0:
                share = min(1.0, (time.thread_time() - cpu) / elapsed)
                self.busy = 0.7 * self.busy + 0.3 * share
