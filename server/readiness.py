"""The ready file: how a process started on port 0 tells its starter which ports it bound."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


def write_ready_file(path: str, payload: dict[str, Any]) -> None:
    """Atomically publish `payload` (bound ports, pid) as JSON at `path`."""
    target = Path(path)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".ready-")
    with os.fdopen(fd, "w") as fh:
        json.dump(payload, fh)
    os.replace(tmp, target)
