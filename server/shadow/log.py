"""The bounded shadow pair log: pairs in memory and, with a path, an append-only JSON-lines
file with rotated backups; `read_log` reads a log (with its backups) back. The one job:
keeping pairs and counts, within bounds.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections import deque
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from server.shadow.pairs import CountRecord, LogContents, ShadowPair, pair_bytes

DEFAULT_MAX_PAIRS = 10_000
DEFAULT_MAX_BYTES = 64 * 1024 * 1024
DEFAULT_MAX_MEMORY_BYTES = 32 * 1024 * 1024
DEFAULT_BACKUPS = 3


class PairLog:
    """A bounded local log of shadow pairs: the newest `max_pairs` in memory, taking at most
    `max_memory_bytes` (see `pair_bytes`; older pairs go first, counted in `evicted` by the bound
    that pushed them out), and, with a `path`, an append-only JSON-lines file rotated to
    ``path.1`` .. ``path.<backups>`` when it would exceed `max_bytes` (so the disk holds at most
    about (backups + 1) * max_bytes).

    Shed and failure counts are only added up by `note_shed` / `note_failure` (O(1), no I/O) and
    written as one "counts" record with the next `append` or `flush`. Event-loop use only: not
    thread-safe. File writes are small and synchronous (one line, flushed) and happen on the
    mirror's side of the request path, never on the caller's.
    """

    def __init__(
        self,
        max_pairs: int = DEFAULT_MAX_PAIRS,
        *,
        path: str | os.PathLike[str] | None = None,
        max_bytes: int = DEFAULT_MAX_BYTES,
        backups: int = DEFAULT_BACKUPS,
        now_ns: Callable[[], int] = time.time_ns,
        max_memory_bytes: int = DEFAULT_MAX_MEMORY_BYTES,
    ) -> None:
        if max_pairs < 1:
            raise ValueError(f"max_pairs: expected an integer >= 1, got {max_pairs!r}")
        if max_memory_bytes < 1:
            raise ValueError(
                f"max_memory_bytes: expected an integer >= 1, got {max_memory_bytes!r}"
            )
        if max_bytes < 1:
            raise ValueError(f"max_bytes: expected an integer >= 1, got {max_bytes!r}")
        if backups < 0:
            raise ValueError(f"backups: expected an integer >= 0, got {backups!r}")
        self.max_pairs = max_pairs
        self.max_memory_bytes = max_memory_bytes
        self._pairs: deque[ShadowPair] = deque()
        self._pair_sizes: deque[int] = deque()  # pair_bytes of each pair held, in step
        self._memory_bytes = 0
        # Pairs pushed out of memory, by the bound that did it ("pairs": max_pairs, "bytes").
        self.evicted: dict[str, int] = {"pairs": 0, "bytes": 0}
        self._counts: deque[CountRecord] = deque(maxlen=max_pairs)
        self._pending_shed: dict[str, int] = {}
        self._pending_failed: dict[tuple[str, str], int] = {}
        self._now_ns = now_ns
        self.path = Path(path) if path is not None else None
        self.max_bytes = max_bytes
        self.backups = backups
        self._file: Any = None
        self._size = 0
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._open()

    def _open(self) -> None:
        assert self.path is not None
        self._file = self.path.open("a", encoding="utf-8")
        self._size = self.path.stat().st_size

    def append(self, pair: ShadowPair) -> None:
        self._write_counts()
        size = pair_bytes(pair)
        self._pairs.append(pair)
        self._pair_sizes.append(size)
        self._memory_bytes += size
        while self._pairs and (
            len(self._pairs) > self.max_pairs or self._memory_bytes > self.max_memory_bytes
        ):
            self.evicted["pairs" if len(self._pairs) > self.max_pairs else "bytes"] += 1
            self._pairs.popleft()
            self._memory_bytes -= self._pair_sizes.popleft()
        self._write({"type": "pair", **pair.to_dict()})

    @property
    def memory_bytes(self) -> int:
        """What the pairs held in memory are charged (pair_bytes), at most max_memory_bytes."""
        return self._memory_bytes

    def note_shed(self, model: str, n: int = 1) -> None:
        self._pending_shed[model] = self._pending_shed.get(model, 0) + n

    def note_failure(self, model: str, shadow_version: str, n: int = 1) -> None:
        key = (model, shadow_version)
        self._pending_failed[key] = self._pending_failed.get(key, 0) + n

    def flush(self) -> None:
        """Record the pending counts now (call it now and then, e.g. every few seconds)."""
        self._write_counts()
        if self._file is not None:
            self._file.flush()

    def pairs(self, since_ns: int | None = None) -> list[ShadowPair]:
        if since_ns is None:
            return list(self._pairs)
        return [p for p in self._pairs if p.time_unix_ns >= since_ns]

    def contents(self, since_ns: int | None = None) -> LogContents:
        """Pairs and counts held in memory, pending counts included."""
        out = LogContents(pairs=self.pairs(since_ns))
        for record in self._counts:
            if since_ns is None or record.time_unix_ns >= since_ns:
                out.add_counts(record)
        now = self._now_ns()
        for model, shed in self._pending_shed.items():
            out.add_counts(CountRecord(now, model, "", shed=shed))
        for (model, version), failed in self._pending_failed.items():
            out.add_counts(CountRecord(now, model, version, failed=failed))
        return out

    def close(self) -> None:
        self.flush()
        if self._file is not None:
            self._file.close()
            self._file = None

    def _write_counts(self) -> None:
        if not self._pending_shed and not self._pending_failed:
            return
        now = self._now_ns()
        records = [CountRecord(now, m, "", shed=n) for m, n in self._pending_shed.items()]
        records += [CountRecord(now, m, v, failed=n) for (m, v), n in self._pending_failed.items()]
        self._pending_shed.clear()
        self._pending_failed.clear()
        for record in records:
            self._counts.append(record)
            self._write({"type": "counts", **record.to_dict()})

    def _write(self, record: Mapping[str, Any]) -> None:
        if self._file is None:
            return
        line = json.dumps(record, separators=(",", ":")) + "\n"
        size = len(line.encode("utf-8"))
        if self._size > 0 and self._size + size > self.max_bytes:
            self._rotate()
        self._file.write(line)
        self._file.flush()
        self._size += size

    def _rotate(self) -> None:
        assert self.path is not None
        assert self._file is not None
        self._file.close()
        if self.backups == 0:
            self.path.unlink()
        else:
            for i in range(self.backups - 1, 0, -1):
                older = _backup(self.path, i)
                if older.exists():
                    older.replace(_backup(self.path, i + 1))
            self.path.replace(_backup(self.path, 1))
        self._open()


def _backup(path: Path, index: int) -> Path:
    return path.with_name(f"{path.name}.{index}")


def log_files(path: str | os.PathLike[str]) -> list[Path]:
    """The log and its rotated backups, oldest first."""
    base = Path(path)
    pattern = re.compile(re.escape(base.name) + r"\.(\d+)")
    backups = [
        (int(m.group(1)), p)
        for p in base.parent.glob(base.name + ".*")
        if (m := pattern.fullmatch(p.name)) is not None
    ]
    files = [p for _, p in sorted(backups, reverse=True)]
    if base.exists():
        files.append(base)
    return files


def read_log(path: str | os.PathLike[str], since_ns: int | None = None) -> LogContents:
    """Everything a JSON-lines pair log (with its backups) holds at or after `since_ns`.

    Lines that do not parse (a line cut short by a crash) are skipped and counted.
    """
    files = log_files(path)
    if not files:
        raise FileNotFoundError(f"no shadow pair log at {path}")
    out = LogContents()
    for file in files:
        with file.open(encoding="utf-8") as lines:
            for line in lines:
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                    kind = record.pop("type", "pair")
                    if since_ns is not None and int(record["time_unix_ns"]) < since_ns:
                        continue
                    if kind == "pair":
                        out.pairs.append(ShadowPair.from_dict(record))
                    elif kind == "counts":
                        out.add_counts(CountRecord(**record))
                    else:
                        out.skipped_lines += 1
                except (ValueError, KeyError, TypeError, AttributeError):
                    out.skipped_lines += 1
    return out
