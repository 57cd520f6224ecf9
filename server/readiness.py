"""The ready file: how a process started on port 0 tells its starter which ports it bound.

The one writer for the server, its workers, the drift sidecar and the bench's peers.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


def write_ready_file(path: str | Path, payload: dict[str, Any]) -> None:
    """Atomically publish `payload` (bound ports, pid) as JSON at `path`: a reader sees either
    no file or the whole document, and a failed write leaves no temporary file behind."""
    target = Path(path)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(payload, fh)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
