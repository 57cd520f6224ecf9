"""The drift sidecar's gRPC side: `TokenGuard` (who may change the sidecar's state, for gRPC
and HTTP alike) and `DriftServicer` (DriftService: check the token, convert, delegate to the
monitor).
"""

from __future__ import annotations

import hmac
import logging
import math
from typing import Any

import grpc

from server._proto import drift_pb2 as pb
from server.clock import Clock, MonotonicClock
from server.drift.monitor import DriftMonitor
from server.drift.producer import ACCEPTED_KEY

log = logging.getLogger("server.drift.sidecar")  # the sidecar's logger, in each of its parts
# Refused calls are logged at most this often (with the count since the last line).
_REFUSAL_LOG_EVERY_S = 60.0


class TokenGuard:
    """Who may change the sidecar's state: with a token, only calls carrying it (gRPC metadata
    or HTTP header `authorization: Bearer TOKEN`, compared with hmac.compare_digest); without
    one, anyone who can reach the listener. Counts and logs (at most once a minute) refusals."""

    def __init__(self, token: str, clock: Clock | None = None) -> None:
        self._token = token.encode()
        self._clock = clock or MonotonicClock()
        self.refused: dict[str, int] = {}
        self._logged_at = -math.inf
        self._unlogged = 0

    @property
    def enabled(self) -> bool:
        return bool(self._token)

    def allows(self, authorization: str | None) -> bool:
        if not self._token:
            return True
        if not authorization:
            return False
        scheme, _, given = authorization.strip().partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(
            given.strip().encode(), self._token
        )

    def allows_grpc(self, context: Any) -> bool:
        if not self._token:
            return True
        for key, value in context.invocation_metadata() or ():
            if key == "authorization" and isinstance(value, str):
                return self.allows(value)
        return False

    def refuse(self, method: str, peer: str) -> None:
        self.refused[method] = self.refused.get(method, 0) + 1
        self._unlogged += 1
        now = self._clock.now()
        if now - self._logged_at >= _REFUSAL_LOG_EVERY_S:
            log.warning(
                "drift sidecar refused %d call(s) without the right token (latest: %s from %s)",
                self._unlogged,
                method,
                peer or "unknown peer",
            )
            self._logged_at = now
            self._unlogged = 0


_UNAUTHENTICATED = "the drift sidecar needs metadata authorization: Bearer <token> ([drift] token)"


class DriftServicer:
    """DriftService over the monitor: each method checks the token (when one is configured),
    then only converts and delegates."""

    def __init__(self, monitor: DriftMonitor, guard: TokenGuard | None = None) -> None:
        self.monitor = monitor
        self.guard = guard or TokenGuard("")

    async def _check(self, method: str, context: Any) -> None:
        if self.guard.allows_grpc(context):
            return
        self.guard.refuse(method, context.peer())
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, _UNAUTHENTICATED)

    async def Record(self, request_iterator: Any, context: Any) -> pb.RecordAck:
        await self._check("Record", context)
        # Tells the producer the stream is accepted: it counts as connected only from here.
        await context.send_initial_metadata(((ACCEPTED_KEY, "1"),))
        received = 0
        self.monitor.streams += 1
        try:
            async for batch in request_iterator:
                received += self.monitor.ingest(batch)
        finally:
            self.monitor.streams -= 1
        return pb.RecordAck(received=received)

    async def PostLabels(self, request: pb.LabelBatch, context: Any) -> pb.LabelAck:
        await self._check("PostLabels", context)
        return self.monitor.post_labels(request)

    async def Report(self, request: pb.ReportRequest, context: Any) -> pb.DriftReport:
        if request.refresh:  # evaluating now changes state (alerts may fire); reading does not
            await self._check("Report", context)
        return self.monitor.report(request.model, request.version, refresh=request.refresh)
