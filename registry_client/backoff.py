"""Capped exponential backoff: the one schedule every retry loop in batchline waits by.

A pure function of the failure count (as redis-py's ``redis/backoff.py`` is): no clock, no
randomness, so a caller adds its own jitter and a test checks it against a table. A leaf that
imports nothing, so that the registry client (which never imports the server) and the server
both use it: the MLflow client's retries, the drift producer's reconnects, the alias watcher's
registry checks.
"""

from __future__ import annotations

# 2**62 times any sensible base is past every cap; the clamp keeps a long outage's failure
# count from overflowing a float.
_MAX_DOUBLINGS = 62


def exponential_backoff(failures: int, base_s: float, cap_s: float) -> float:
    """Seconds to wait after the `failures`-th failure in a row (1-based).

    base, 2 base, 4 base, ... never more than `cap_s`; 0 before the first failure.
    """
    if failures < 1:
        return 0.0
    return float(min(cap_s, base_s * 2.0 ** min(failures - 1, _MAX_DOUBLINGS)))
