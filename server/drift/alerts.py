"""What the drift sidecar does when an alert fires: the `Alert` record, and `AlertActions`
(one JSON log line, an optional webhook POST and command run, bounded and in the
background).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shlex
import urllib.request
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("server.drift.sidecar")  # the sidecar's logger, in each of its parts


@dataclass(frozen=True, slots=True)
class Alert:
    """One threshold crossing."""

    rule: str
    metric: str
    value: float
    threshold: float
    model: str
    version: str
    role: str
    feature: str
    at_unix_s: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "event": "drift_alert",
            "rule": self.rule,
            "metric": self.metric,
            "value": self.value,
            "threshold": self.threshold,
            "model": self.model,
            "version": self.version,
            "role": self.role,
            "feature": self.feature,
            "at_unix_s": self.at_unix_s,
        }


class AlertActions:
    """What a fired alert does: one JSON log line, then (optionally) a webhook POST and a
    command run with the alert in $BATCHLINE_ALERT. Actions run in the background, at most
    `max_in_flight` at once (more are skipped and logged), each bounded by `timeout_s`."""

    def __init__(
        self,
        webhook: str = "",
        command: str = "",
        *,
        timeout_s: float = 10.0,
        max_in_flight: int = 8,
    ) -> None:
        self.webhook = webhook
        self.command = shlex.split(command) if command else []
        self.timeout_s = timeout_s
        self.max_in_flight = max_in_flight
        self.failures = 0
        self.skipped = 0
        self._tasks: set[asyncio.Task[None]] = set()

    def __call__(self, alert: Alert) -> None:
        payload = json.dumps(alert.to_dict())
        log.warning(
            "drift alert %s: %s=%.4g (threshold %g) on %s:%s %s %s",
            alert.rule,
            alert.metric,
            alert.value,
            alert.threshold,
            alert.model,
            alert.version,
            alert.role,
            alert.feature,
            extra={"model": alert.model, "version": alert.version},
        )
        if self.webhook:
            self._spawn(self._post(payload))
        if self.command:
            self._spawn(self._run(payload))

    def _spawn(self, coro: Any) -> None:
        if len(self._tasks) >= self.max_in_flight:
            coro.close()
            self.skipped += 1
            log.warning("drift alert action skipped: %d already running", len(self._tasks))
            return
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _post(self, payload: str) -> None:
        def post() -> None:
            request = urllib.request.Request(
                self.webhook,
                data=payload.encode(),
                headers={"Content-Type": "application/json"},
                method="POST",
            )
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                response.read()

        try:
            await asyncio.to_thread(post)
        except Exception as exc:
            self.failures += 1
            log.warning("drift alert webhook %s failed: %s", self.webhook, exc)

    async def _run(self, payload: str) -> None:
        try:
            proc = await asyncio.create_subprocess_exec(
                *self.command,
                env={**os.environ, "BATCHLINE_ALERT": payload},
                stdin=asyncio.subprocess.DEVNULL,
            )
        except OSError as exc:
            self.failures += 1
            log.warning("drift alert command %s failed to start: %s", self.command[0], exc)
            return
        try:
            code = await asyncio.wait_for(proc.wait(), self.timeout_s)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            code = -9
        if code != 0:
            self.failures += 1
            log.warning("drift alert command %s exited with %s", self.command[0], code)

    async def close(self, grace_s: float = 5.0) -> None:
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=grace_s)
        for task in list(self._tasks):
            task.cancel()
