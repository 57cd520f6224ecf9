"""The automatic promotion gate: promote a shadow that agrees with the primary, drop one that
does not, from the side-by-side pairs the mirror collects.

Per model with `gate_action` other than "off", every `gate_interval_s`: the pairs since the
shadow joined the route (same primary version) are compared (server/shadow/compare.py) and judged by
`evaluate_gate`. Every decision other than "wait" is logged with its numbers. With
`gate_action = "apply"`, "promote" moves the model's alias to the shadow's version in the
registry and reloads (the shadow becomes the primary, through the usual safe swap), and
"rollback" removes the shadow from the route. Canary versions yield no pairs; gate them by
hand (`batchline registry promote`).

With `--workers N` the gate runs in worker 0 alone and judges the pairs of every worker (each
writes its pairs to a log file in the workers' folder; `pooled_pairs` reads them together), so
the decision is made once, on all the traffic; its action goes through the control plane, which
every worker follows.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from server.errors import ServingError
from server.models import ModelManager
from server.shadow.compare import compare
from server.shadow.gate import GateDecision, evaluate_gate
from server.shadow.log import PairLog, read_log
from server.shadow.pairs import LogContents

if TYPE_CHECKING:
    from server.control import ControlPlane

log = logging.getLogger(__name__)


def pooled_pairs(own: PairLog, others: Sequence[Path]) -> Callable[[], LogContents]:
    """This worker's pairs (memory) and every other worker's (their log files), together."""

    def contents() -> LogContents:
        out = own.contents()
        for path in others:
            try:
                theirs = read_log(path)
            except FileNotFoundError:
                continue  # that worker has written no pair yet
            out.pairs.extend(theirs.pairs)
            for model, n in theirs.shed.items():
                out.shed[model] = out.shed.get(model, 0) + n
            for key, n in theirs.failures.items():
                out.failures[key] = out.failures.get(key, 0) + n
            out.skipped_lines += theirs.skipped_lines
        return out

    return contents


class PromotionGate:
    def __init__(
        self,
        models: ModelManager,
        pair_log: PairLog,
        *,
        count_from_ns: int | None = None,
        contents: Callable[[], LogContents] | None = None,
        control: ControlPlane | None = None,
    ) -> None:
        """`count_from_ns`: pairs older than this never count (default: from each shadow's
        first check, so a route change starts a fresh judgement). `contents`: where the pairs
        come from (default: `pair_log`'s memory; `pooled_pairs` for several workers).
        `control`: the control plane its actions go through (default: this process alone)."""
        self._models = models
        self._pairs = pair_log
        self._contents = contents or pair_log.contents
        self._control = control
        self._count_from = count_from_ns
        # When each (model, shadow version) joined its current route (pairs before don't count).
        self._since: dict[tuple[str, str, str], int] = {}

    async def check(self, name: str) -> dict[str, GateDecision]:
        """Judge every shadow of `name` once; act on the decisions when asked to."""
        (status,) = self._models.status(name)
        settings = status.settings
        route = status.route
        if settings.gate_action == "off" or route is None or not route.shadows:
            return {}
        config = settings.gate
        contents = self._contents()
        decisions = {}
        for spec in route.shadows:
            key = (name, route.primary, spec.version)
            since = self._since.setdefault(
                key, time.time_ns() if self._count_from is None else self._count_from
            )
            pairs = [
                p
                for p in contents.pairs
                if p.model == name
                and p.shadow_version == spec.version
                and p.primary_version == route.primary
                and p.time_unix_ns >= since
            ]
            failures = contents.failures.get((name, spec.version), 0)
            reports = compare(pairs, failures={(name, spec.version): failures})
            if not reports:
                continue
            decision = evaluate_gate(reports[0], failures, config)
            decisions[spec.version] = decision
            if decision.action == "wait":
                continue
            log.warning(
                "promotion gate for %s version %s (primary %s): %s%s",
                name,
                spec.version,
                route.primary,
                decision.summary(),
                "" if settings.gate_action == "apply" else " (gate_action = log: not applied)",
            )
            if settings.gate_action == "apply":
                await self._apply(name, spec.version, decision)
                break  # the route changed: judge the rest next time
        return decisions

    async def _apply(self, name: str, version: str, decision: GateDecision) -> None:
        (status,) = self._models.status(name)
        route = status.route
        assert route is not None
        if decision.action == "promote":
            alias = status.alias or "production"
            registry = self._models.registry
            await asyncio.get_running_loop().run_in_executor(
                None, registry.set_alias, name, alias, version
            )
            if self._control is not None:
                await self._control.reload(name)
            else:
                await self._models.reload(name)
        else:
            shadows = tuple(s for s in route.shadows if s.version != version)
            new_route = replace(route, shadows=shadows)
            if self._control is not None:
                await self._control.set_route(name, new_route)
            else:
                await self._models.set_route(name, new_route)

    async def run(self, interval_s: float) -> None:
        """Check every gated model every `interval_s`, until cancelled; errors are logged."""
        while True:
            await asyncio.sleep(interval_s)
            for name in self._models.names():
                try:
                    await self.check(name)
                except ServingError as exc:
                    log.error("promotion gate for %s could not act: %s", name, exc.message)
