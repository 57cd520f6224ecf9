"""A locustfile with no users, loaded beside loadtest/locustfile.py by the locust tests
(``-f loadtest/locustfile.py,tests/support/locust_record.py``): when locust quits it writes the
run's final stats entries and errors, as JSON, to the path in ``BATCHLINE_LOCUST_RECORD``.

locust's ``--csv`` files are rewritten by a greenlet once a second and only closed at the end,
so they hold the last snapshot, up to a second old; requests that fail or finish after it are in
the printed summary and the exit code but not in the files. This record is taken on locust's
``quit`` event, after the runner has stopped every user, so nothing is counted after it.
"""

from __future__ import annotations

import json
import os
from typing import Any

from locust import events
from locust.env import Environment

_environment: list[Environment] = []


@events.init.add_listener
def _keep(environment: Environment, **_: Any) -> None:
    _environment.append(environment)


@events.quit.add_listener
def _record(exit_code: int, **_: Any) -> None:
    path = os.environ.get("BATCHLINE_LOCUST_RECORD")
    if not path or not _environment:
        return
    stats = _environment[0].stats
    record = {
        "exit_code": exit_code,
        "entries": {
            entry.name: {
                "requests": entry.num_requests,
                "failures": entry.num_failures,
                "content_length": entry.total_content_length,
            }
            for entry in stats.entries.values()
        },
        "errors": [
            {"name": error.name, "error": str(error.error), "occurrences": error.occurrences}
            for error in stats.errors.values()
        ],
    }
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(record, fh)
