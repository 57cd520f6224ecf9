"""How many REST requests may start per event-loop turn while gRPC calls are in flight (on the
grpcio transport: the native one's calls take no more turns than REST's, and the App gives it
no budget).

Both bindings run on one loop, and the loop serves whatever is ready, turn by turn. A REST
request is ready the moment its bytes arrive and runs to its batch in the same turn; a grpc.aio
unary call needs several turns (its task hops and two completion-queue round trips through the
poller thread: receive the message, send the reply), each behind everything else that was ready.
With 32 clients of each, every turn ran dozens of REST requests and gRPC got ~1/10 of the
throughput even after its accept path was widened (server/api/acceptor.py): gRPC's completions
come back through gRPC core's threads, and each of its steps waits for a turn of the loop, so
the longer the turns, the slower every gRPC call (a loop made of 1 ms turns by anything at all,
even sleeping, cuts grpc.aio alone from ~5,000 to ~150 req/s here).

`TurnBudget` bounds the REST requests started per turn while `contended()` says gRPC has calls
in flight: the rest wait, first come first served, for the next turns. Turns stay short, so
gRPC's chain moves; REST alone (no gRPC in flight) never waits. The policy is a pure counter
reset once per turn by a callback the loop runs; nothing here measures time.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable

# REST starts per turn while gRPC is busy. Measured on the 2-core machine, 32 HTTP + 32 gRPC
# perf_analyzer clients (sync), gRPC req/s over HTTP's, medians of 3: no budget 0.10, 2 per turn
# 0.14, 1 per turn 0.26 (grpc.aio's accept path widened in all three; 0.04 without it).
DEFAULT_PER_TURN = 1


class TurnBudget:
    """At most `per_turn` admissions per loop turn while `contended()`; later ones wait in
    arrival order. Cancelled waiters are skipped and never take a slot."""

    def __init__(self, per_turn: int, contended: Callable[[], bool]) -> None:
        if per_turn < 1:
            raise ValueError("per_turn must be >= 1")
        self._per_turn = per_turn
        self._contended = contended
        self._used = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._tick: asyncio.Handle | None = None
        self.waited = 0  # admissions that had to wait for a later turn (tests, benches)

    def try_admit(self) -> bool:
        """Admit now (True) or not (False: `await wait()` next)."""
        if self._waiters:
            return False
        if not self._contended():
            return True
        if self._used >= self._per_turn:
            return False
        self._used += 1
        self._arm()
        return True

    async def wait(self) -> None:
        """Wait for a slot in a later turn."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        self._waiters.append(future)
        self.waited += 1
        self._arm()
        await future

    def _arm(self) -> None:
        if self._tick is None:
            self._tick = asyncio.get_running_loop().call_soon(self._turn)

    def _turn(self) -> None:
        # Runs once in the turn after the budget was first used: a fresh budget, handed to the
        # waiters first (all of them once gRPC is no longer busy).
        self._tick = None
        self._used = 0
        waiters = self._waiters
        limited = self._contended()
        while waiters and (not limited or self._used < self._per_turn):
            future = waiters.popleft()
            if future.done():
                continue
            future.set_result(None)
            self._used += 1
        if waiters or self._used:
            self._arm()
