"""The in-server end of the drift stream: predictions -> bounded queue -> the drift sidecar.

`DriftProducer.record()` is what the serving path calls once per answered request. It only
appends a tuple of references to a bounded deque (no copying, no protobuf, no I/O), so it costs
about a microsecond, never blocks and never raises. A background task turns queued tuples into
`PredictionBatch` chunks and writes them on one long-lived client-streaming `Record` call. When
the sidecar is away the task reconnects with capped exponential backoff; records keep queueing
meanwhile, and what does not fit is dropped and counted as `dropped_disconnected` (while
connected, as `dropped_full`: the sidecar is not keeping up).

The queue is bounded in records (`queue_size`) and in bytes (`max_queue_bytes`: the record's
strings, the `nbytes` of its arrays and a fixed overhead), so big records or long ids cannot
hold more memory than configured. Losses are said, not only counted: a sidecar unreachable for
longer than `warn_after_s` (never reached, or lost) is logged at WARNING with how long and how
many records were dropped, again at most every `warn_after_s`, and at INFO when it is back;
`stop()` logs one WARNING with the counts when anything was dropped over the producer's life.

With a `token`, every stream carries `authorization: Bearer <token>`; the stream counts as
connected only once the sidecar has accepted it (it sends its initial metadata after the check),
so a refused token reads as "unreachable" (and is logged as such, naming the status).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import socket
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import grpc
import numpy as np

from registry_client.backoff import exponential_backoff
from server._proto import drift_pb2 as pb
from server._proto import drift_pb2_grpc as pb_grpc
from server.clock import Clock, MonotonicClock
from server.config.drift import DriftSettings

log = logging.getLogger(__name__)

# The initial metadata the sidecar sends once it has accepted a Record stream (token checked): a
# refusal answers trailers only, so the producer counts as connected only on seeing this key.
ACCEPTED_KEY = "batchline-drift-accepted"

ROLES: dict[str, pb.Role] = {
    "primary": pb.ROLE_PRIMARY,
    "canary": pb.ROLE_CANARY,
    "shadow": pb.ROLE_SHADOW,
}
# How often an idle sender looks at its stream, to notice a sidecar that went away.
_IDLE_CHECK_S = 0.5
_CHANNEL_OPTIONS = [
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
    # Each attempt gets a fresh channel with its own subchannel, so gRPC's connection backoff
    # (1 s and up, shared process-wide by default) does not stack on top of ours.
    ("grpc.use_local_subchannel_pool", 1),
]

# (model, version, role, request_id, entity_id, features, scores, labels, latency_s, time_ns)
_Item = tuple[str, str, str, str, str, Any, Any, Any, float, int]
# What the queue holds: an _Item and, last, what it is charged against max_queue_bytes.
_Queued = tuple[str, str, str, str, str, Any, Any, Any, float, int, int]
# What one queued record costs besides its strings and arrays: the tuple, its number objects,
# the array objects and the deque slots (about 730 bytes measured with tracemalloc; rounded up).
RECORD_OVERHEAD_BYTES = 1024
# One chunk written to the stream stays well under gRPC's message limits whatever the records.
_CHUNK_MAX_BYTES = 4 * 1024 * 1024


def _str_bytes(text: str) -> int:
    # An upper bound of what the str takes beyond its header: 1 byte a character when ASCII,
    # up to 4 otherwise (PEP 393), without encoding it (isascii() is O(1)).
    return len(text) if text.isascii() else 4 * len(text)


def _array_bytes(value: Any) -> int:
    if value is None:
        return 0
    nbytes = getattr(value, "nbytes", None)
    if isinstance(nbytes, int):
        return nbytes
    try:
        return 8 * len(value)
    except TypeError:
        return 8


def record_bytes(
    model: str,
    version: str,
    request_id: str,
    entity_id: str,
    features: Any,
    scores: Any,
    labels: Any,
) -> int:
    """What one queued record is charged against `max_queue_bytes`. Arrays count their own
    `nbytes` (an output row sliced from a batch shares the batch's buffer, which is bounded by
    the model's max_batch_size and freed once every record of that batch is sent)."""
    return (
        RECORD_OVERHEAD_BYTES
        + _str_bytes(model)
        + _str_bytes(version)
        + _str_bytes(request_id)
        + _str_bytes(entity_id)
        + _array_bytes(features)
        + _array_bytes(scores)
        + _array_bytes(labels)
    )


class _StreamEnded(Exception):
    pass


def to_record(item: _Item | _Queued) -> pb.PredictionRecord:
    """One queued tuple as a PredictionRecord (runs in the background task, not per request)."""
    model, version, role, request_id, entity_id, features, scores, labels, latency_s, t_ns = item[
        :10
    ]
    matrix = np.asarray(features, dtype=np.float32)
    rows = matrix.shape[0] if matrix.ndim > 1 else 1
    flat = matrix.ravel()
    score = np.asarray(scores, dtype=np.float32).ravel() if scores is not None else flat[:0]
    if score.size != rows and rows and score.size % rows == 0:
        # Class probabilities [rows, classes] (or one row's [classes]): the last class, which is
        # the positive class of a binary classifier.
        score = score.reshape(rows, -1)[:, -1]
    return pb.PredictionRecord(
        model=model,
        version=version,
        role=ROLES.get(role, pb.ROLE_UNSPECIFIED),
        request_id=request_id,
        entity_id=entity_id,
        rows=rows,
        n_features=flat.size // rows if rows else 0,
        features=flat.tolist(),
        scores=score.tolist(),
        labels=np.asarray(labels, dtype=np.int64).ravel().tolist() if labels is not None else (),
        latency_s=latency_s,
        time_unix_ns=t_ns,
    )


class DriftProducer:
    """Streams prediction records to the drift sidecar without ever slowing a request.

    Guarantees: `record()` is O(1), never blocks, never raises, and keeps at most `queue_size`
    records and `max_queue_bytes` bytes (see `record_bytes`); every record is either sent,
    sampled out, or counted in exactly one of
    `dropped_full` / `dropped_disconnected` / `errors` (records still queued when `stop()` gives
    up count as `dropped_disconnected`). "Sent" means written to the stream: a chunk in flight
    when the sidecar dies is lost uncounted. Call `record()` from the event loop's thread. Arrays passed to it
    are kept by reference until sent: don't mutate them afterwards.
    """

    def __init__(
        self,
        target: str,
        *,
        queue_size: int = 10000,
        max_queue_bytes: int = 64 * 1024 * 1024,
        chunk: int = 256,
        sample_ratio: float = 1.0,
        clock: Clock | None = None,
        linger_s: float = 0.05,
        backoff_initial_s: float = 0.05,
        backoff_max_s: float = 5.0,
        connect_timeout_s: float = 2.0,
        producer_id: str | None = None,
        rng: Callable[[], float] | None = None,
        token: str = "",
        warn_after_s: float = 30.0,
    ) -> None:
        if queue_size < 1 or chunk < 1 or max_queue_bytes < 1:
            raise ValueError("queue_size, max_queue_bytes and chunk must be >= 1")
        if warn_after_s <= 0:
            raise ValueError(f"warn_after_s: expected > 0, got {warn_after_s}")
        if not 0.0 <= sample_ratio <= 1.0:
            raise ValueError(f"sample_ratio: expected 0..1, got {sample_ratio}")
        self.target = target
        self.queue_size = queue_size
        self.max_queue_bytes = max_queue_bytes
        self.warn_after_s = warn_after_s
        self.chunk = chunk
        self.sample_ratio = sample_ratio
        self.linger_s = linger_s
        self.producer_id = producer_id or f"{socket.gethostname()}:{os.getpid()}"
        self._clock = clock or MonotonicClock()
        self._random = rng or random.random
        self._backoff_initial_s = backoff_initial_s
        self._backoff_max_s = backoff_max_s
        self._connect_timeout_s = connect_timeout_s
        self._options = [
            *_CHANNEL_OPTIONS,
            ("grpc.initial_reconnect_backoff_ms", max(10, int(backoff_initial_s * 1000))),
            ("grpc.max_reconnect_backoff_ms", max(10, int(backoff_max_s * 1000))),
        ]
        self._metadata = (("authorization", f"Bearer {token}"),) if token else None
        self._queue: deque[_Queued] = deque()
        self._queue_bytes = 0
        self._wake = asyncio.Event()
        self._waiting = False
        self._connected = False
        self._closing = False
        self._task: asyncio.Task[None] | None = None
        self._disconnected_since: float | None = None
        self._ever_connected = False
        self._warned_at: float | None = None  # the last "unreachable" warning of this outage
        self._dropped_at_outage = 0  # dropped_total() when the outage began
        self._last_failure = ""
        # Counters (plain ints, read by the server's metrics at scrape time).
        self.sent = 0
        self.dropped_full = 0
        self.dropped_disconnected = 0
        self.reconnects = 0
        self.sampled_out = 0
        self.errors = 0

    # -- the request path ------------------------------------------------------------------

    @classmethod
    def from_settings(cls, settings: DriftSettings, *, clock: Clock | None = None) -> DriftProducer:
        """The producer the [drift] section describes (its values already checked)."""
        return cls(
            settings.target,
            queue_size=settings.queue_size,
            max_queue_bytes=settings.max_queue_bytes,
            chunk=settings.chunk,
            sample_ratio=settings.sample_ratio,
            clock=clock,
            backoff_max_s=settings.backoff_max_s,
            token=settings.resolved_token(),
            warn_after_s=settings.warn_after_s,
        )

    def record(
        self,
        model: str,
        version: str,
        role: str,
        request_id: str,
        entity_id: str,
        features: Any,
        scores: Any,
        labels: Any = None,
        latency_s: float = 0.0,
    ) -> None:
        """Queue one answered request: `features` [rows, n_features] (or [n_features]),
        `scores` [rows] or class probabilities [rows, classes] / [classes] (the last class is
        taken),
        `labels` [rows] predicted labels or None. Never blocks, never raises."""
        try:
            if self.sample_ratio < 1.0 and self._random() >= self.sample_ratio:
                self.sampled_out += 1
                return
            # record_bytes(), inlined on the common path (numpy arrays, ASCII ids): it is most
            # of what record() costs.
            try:
                size = (
                    RECORD_OVERHEAD_BYTES
                    + len(model)
                    + len(version)
                    + (len(request_id) if request_id.isascii() else 4 * len(request_id))
                    + (len(entity_id) if entity_id.isascii() else 4 * len(entity_id))
                    + features.nbytes
                    + scores.nbytes
                    + (0 if labels is None else labels.nbytes)
                )
            except AttributeError:
                size = record_bytes(model, version, request_id, entity_id, features, scores, labels)
            if (
                len(self._queue) >= self.queue_size
                or self._queue_bytes + size > self.max_queue_bytes
                or self._closing
            ):
                if self._connected:
                    self.dropped_full += 1
                else:
                    self.dropped_disconnected += 1
                return
            self._queue.append(
                (
                    model,
                    version,
                    role,
                    request_id,
                    entity_id,
                    features,
                    scores,
                    labels,
                    latency_s,
                    time.time_ns(),
                    size,
                )
            )
            self._queue_bytes += size
            if self._waiting:
                self._wake.set()
        except Exception:
            self.errors += 1

    # -- state -----------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._connected

    @property
    def pending(self) -> int:
        return len(self._queue)

    @property
    def pending_bytes(self) -> int:
        """What the queued records are charged (record_bytes), at most max_queue_bytes."""
        return self._queue_bytes

    def dropped_total(self) -> int:
        return self.dropped_full + self.dropped_disconnected

    def disconnected_for(self) -> float:
        """Seconds since the stream was last up (0 while connected)."""
        if self._connected or self._disconnected_since is None:
            return 0.0
        return self._clock.now() - self._disconnected_since

    def counters(self) -> dict[str, int]:
        return {
            "sent": self.sent,
            "dropped_full": self.dropped_full,
            "dropped_disconnected": self.dropped_disconnected,
            "reconnects": self.reconnects,
            "sampled_out": self.sampled_out,
            "errors": self.errors,
            "pending": len(self._queue),
            "pending_bytes": self._queue_bytes,
        }

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        if self._task is None:
            self._disconnected_since = self._clock.now()
            self._task = asyncio.get_running_loop().create_task(self._run(), name="drift-producer")

    async def stop(self, flush_timeout_s: float = 2.0) -> None:
        """Send what is queued (within `flush_timeout_s`), close the stream and stop; then, if
        any record was ever dropped, say so in one WARNING line with the counts."""
        task = self._task
        if task is None:
            return
        self._closing = True
        self._wake.set()
        try:
            await asyncio.wait_for(asyncio.shield(task), flush_timeout_s)
        except TimeoutError:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        except Exception:  # the task logs its own failures
            pass
        unsent = len(self._queue)
        self.dropped_disconnected += unsent
        self._queue.clear()
        self._queue_bytes = 0
        self._task = None
        if self.dropped_total():
            log.warning(
                "drift producer stopped: %d prediction records never reached the sidecar at %s "
                "(%d dropped with the queue full, %d while it was unreachable, of which %d were "
                "still queued at the %.1fs flush deadline); %d sent",
                self.dropped_total(),
                self.target,
                self.dropped_full,
                self.dropped_disconnected,
                unsent,
                flush_timeout_s,
                self.sent,
            )

    # -- the background sender -------------------------------------------------------------

    async def _run(self) -> None:
        failures = 0
        while True:
            channel = grpc.aio.insecure_channel(self.target, options=self._options)
            try:
                await asyncio.wait_for(channel.channel_ready(), self._connect_timeout_s)
                call = pb_grpc.DriftServiceStub(channel).Record(metadata=self._metadata)
                # The sidecar sends its initial metadata once it has accepted the stream (the
                # token checked); a refusal ends the call instead, and raises here.
                metadata = await asyncio.wait_for(call.initial_metadata(), self._connect_timeout_s)
                if call.done() or not any(k == ACCEPTED_KEY for k, _ in metadata or ()):
                    # A refusal answers with trailers only (its initial metadata is empty, and
                    # the call may not read as done yet): raise its status, not "connected".
                    await call
                    raise _StreamEnded("the sidecar ended the stream at once")
                self._set_connected(True)
                failures = 0
                await self._pump(call)
                # Closing, and everything queued is written: half-close and wait for the ack.
                await call.done_writing()
                await call
                return
            except (
                grpc.aio.AioRpcError,
                asyncio.InvalidStateError,
                TimeoutError,
                _StreamEnded,
            ) as exc:
                if isinstance(exc, grpc.aio.AioRpcError):
                    detail = f"{exc.code().name}: {exc.details()}"
                    if exc.code() == grpc.StatusCode.UNAUTHENTICATED:
                        detail += " (check [drift] token / BATCHLINE_DRIFT_TOKEN on both ends)"
                elif isinstance(exc, TimeoutError):
                    detail = f"no connection within {self._connect_timeout_s:g}s"
                else:
                    detail = str(exc) or type(exc).__name__
                self._last_failure = detail
                log.debug("drift stream to %s down: %s", self.target, detail)
            except asyncio.CancelledError:
                raise
            except Exception:
                self.errors += 1
                log.exception("drift producer: unexpected error; reconnecting")
            finally:
                self._set_connected(False)
                await channel.close(grace=None)
            failures += 1
            if self._closing and not self._queue:
                return
            self._warn_if_away()
            delay = exponential_backoff(failures, self._backoff_initial_s, self._backoff_max_s)
            delay *= 0.5 + 0.5 * self._random()
            if not self._closing:
                # Wake for the next "unreachable" warning too, not only for the next attempt
                # (never sooner than the first backoff step: no busy loop).
                delay = min(delay, max(self._backoff_initial_s, self._next_warning_in()))
            await self._pause(delay)

    async def _pump(self, call: Any) -> None:
        queue = self._queue
        while True:
            if not queue:
                if self._closing:
                    return
                self._wake.clear()
                self._waiting = True
                try:
                    await asyncio.wait_for(self._wake.wait(), _IDLE_CHECK_S)
                except TimeoutError:
                    if call.done():
                        await call  # raises the stream's error, if it has one
                        raise _StreamEnded("the sidecar ended the stream") from None
                finally:
                    self._waiting = False
                continue
            if len(queue) < self.chunk and self.linger_s > 0 and not self._closing:
                # Let a chunk fill: one write of 256 records costs about what one of 10 does.
                await asyncio.sleep(self.linger_s)
            items: list[_Queued] = []
            chunk_bytes = 0
            while (
                queue
                and len(items) < self.chunk
                and (not items or chunk_bytes + queue[0][10] <= _CHUNK_MAX_BYTES)
            ):
                item = queue.popleft()
                items.append(item)
                chunk_bytes += item[10]
                self._queue_bytes -= item[10]
            batch = pb.PredictionBatch(
                producer=self.producer_id,
                dropped_total=self.dropped_full + self.dropped_disconnected,
            )
            records = batch.records
            for item in items:
                try:
                    records.append(to_record(item))
                except Exception:
                    self.errors += 1
            try:
                await call.write(batch)
            except BaseException:
                # The chunk in hand never reached the sidecar.
                self.dropped_disconnected += len(items)
                raise
            self.sent += len(records)

    def _set_connected(self, up: bool) -> None:
        if up and not self._connected:
            if self._ever_connected:
                self.reconnects += 1
            if self._warned_at is not None:
                log.info(
                    "drift sidecar at %s reachable again after %.1fs; %d prediction records "
                    "were dropped while it was away",
                    self.target,
                    self.disconnected_for(),
                    self.dropped_total() - self._dropped_at_outage,
                )
            elif self._ever_connected:
                log.info("drift stream to %s resumed", self.target)
            self._warned_at = None
            self._ever_connected = True
        elif not up and self._connected:
            self._disconnected_since = self._clock.now()
            self._dropped_at_outage = self.dropped_total()
            if not self._closing:
                log.info("drift stream to %s lost; reconnecting with backoff", self.target)
        self._connected = up

    def _next_warning_in(self) -> float:
        """Seconds until the next "unreachable" warning is due (inf while connected)."""
        if self._connected or self._disconnected_since is None:
            return float("inf")
        if self._warned_at is None:
            return self._disconnected_since + self.warn_after_s - self._clock.now()
        return self._warned_at + self.warn_after_s - self._clock.now()

    def _warn_if_away(self) -> None:
        if self._closing or self._next_warning_in() > 0:
            return
        self._warned_at = self._clock.now()
        dropped = self.dropped_total() - self._dropped_at_outage
        log.warning(
            "drift sidecar at %s unreachable for %.1fs (%s; last error: %s): %d prediction "
            "records dropped meanwhile, %d dropped in all, %d waiting in the queue",
            self.target,
            self.disconnected_for(),
            "never connected" if not self._ever_connected else "connection lost",
            self._last_failure or "none",
            dropped,
            self.dropped_total(),
            len(self._queue),
        )

    async def _pause(self, seconds: float) -> None:
        # Backoff that stop() can cut short.
        self._wake.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), seconds)
