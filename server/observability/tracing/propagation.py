"""The W3C trace context: reading a caller's `traceparent` / `tracestate` (`ParentParser`,
mixed into `Tracing`), the trace flags, the parsed-tracestate cache and new span and trace
ids (`random.getrandbits`, never the invalid id 0).
"""

from __future__ import annotations

import random
import re
from functools import lru_cache

from opentelemetry.trace import INVALID_SPAN_ID, INVALID_TRACE_ID, TraceState, get_current_span
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

# Version 00, lower-case hex, nothing around it: the common case, parsed here. Anything else
# goes to the SDK's propagator, which applies the rest of the W3C rules.
_TRACEPARENT_00 = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
_SAMPLED = 0x01
_RANDOM_TRACE_ID = 0x02
_getrandbits = random.getrandbits


class ParentParser:
    """The caller's trace context; `Tracing` supplies the SDK propagator for odd headers."""

    _propagator: TraceContextTextMapPropagator

    def _parse_parent(
        self, traceparent: str | bytes, tracestate: str | bytes | None
    ) -> tuple[int, int, int, str | None] | None:
        """(trace id, parent span id, flags, raw tracestate) of a valid traceparent, else None."""
        if isinstance(traceparent, bytes):
            traceparent = traceparent.decode("ascii", "replace")
        if isinstance(tracestate, bytes):
            tracestate = tracestate.decode("ascii", "replace")
        match = _TRACEPARENT_00.fullmatch(traceparent)
        if match is not None:
            trace_id = int(match.group(1), 16)
            span_id = int(match.group(2), 16)
            if trace_id == INVALID_TRACE_ID or span_id == INVALID_SPAN_ID:
                return None
            return trace_id, span_id, int(match.group(3), 16), tracestate
        carrier = {"traceparent": traceparent}
        if tracestate is not None:
            carrier["tracestate"] = tracestate
        context = get_current_span(self._propagator.extract(carrier)).get_span_context()
        if not context.is_valid:
            return None
        return context.trace_id, context.span_id, int(context.trace_flags), tracestate


def _span_id() -> int:
    span_id = _getrandbits(64)
    while span_id == INVALID_SPAN_ID:
        span_id = _getrandbits(64)
    return span_id


def _trace_id() -> int:
    trace_id = _getrandbits(128)
    while trace_id == INVALID_TRACE_ID:
        trace_id = _getrandbits(128)
    return trace_id


@lru_cache(maxsize=256)
def _trace_state(raw: str | None) -> TraceState | None:
    return TraceState.from_header([raw]) if raw else None
