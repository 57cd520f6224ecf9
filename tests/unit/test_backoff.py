"""The one backoff schedule, against a table written by hand: base x 2^(failures - 1), capped."""

from __future__ import annotations

import pytest

from registry_client.backoff import exponential_backoff
from server.models import reload_backoff

# (failures, base_s, cap_s, seconds): worked out on paper, not by the function.
TABLE = [
    # no failure yet: no wait
    (0, 0.1, 2.0, 0.0),
    (-1, 0.1, 2.0, 0.0),
    # the MLflow client's schedule (base 0.1 s, cap 2 s)
    (1, 0.1, 2.0, 0.1),
    (2, 0.1, 2.0, 0.2),
    (3, 0.1, 2.0, 0.4),
    (4, 0.1, 2.0, 0.8),
    (5, 0.1, 2.0, 1.6),
    (6, 0.1, 2.0, 2.0),  # 3.2 capped
    (50, 1.0, 30.0, 30.0),
    # the drift producer's defaults (initial 0.05 s, max 5 s)
    (1, 0.05, 5.0, 0.05),
    (7, 0.05, 5.0, 3.2),
    (8, 0.05, 5.0, 5.0),  # 6.4 capped
    (4, 0.1, 1.0, 0.8),
    (5, 0.1, 1.0, 1.0),  # 1.6 capped
    # base 2 s, cap 60 s (the alias watcher's, below)
    (2, 2.0, 60.0, 4.0),
    (5, 2.0, 60.0, 32.0),
    (6, 2.0, 60.0, 60.0),  # 64 capped
    # a cap below the base wins at once
    (1, 5.0, 1.0, 1.0),
    # a long outage neither overflows nor passes the cap
    (10_000, 0.1, 1.0, 1.0),
    (2**40, 0.1, 1.0, 1.0),
]


@pytest.mark.parametrize(("failures", "base_s", "cap_s", "seconds"), TABLE)
def test_backoff_is_the_tables_value(
    failures: int, base_s: float, cap_s: float, seconds: float
) -> None:
    assert exponential_backoff(failures, base_s, cap_s) == pytest.approx(seconds, rel=1e-12)


# The alias watcher with poll interval 2 s: the interval while healthy, doubled per failure.
WATCHER = [(0, 2.0), (1, 4.0), (2, 8.0), (4, 32.0), (5, 60.0), (400, 60.0)]


@pytest.mark.parametrize(("failures", "seconds"), WATCHER)
def test_the_alias_watcher_waits_the_interval_doubled_per_failure(
    failures: int, seconds: float
) -> None:
    assert reload_backoff(failures, 2.0) == pytest.approx(seconds, rel=1e-12)
