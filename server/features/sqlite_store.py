"""SQLite feature store (`sqlite:///path`): the embedded default, same interface as Redis.

Reads run inline: a local primary-key lookup costs microseconds, less than a thread hop.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from pathlib import Path

from server.features.store import FeatureStoreError

_CHUNK = 500  # SQLite's default limit on bound parameters is 999


class SqliteFeatureStore:
    def __init__(self, path: str | Path) -> None:
        self.description = f"sqlite:///{path}"
        try:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS features (key TEXT PRIMARY KEY, value BLOB NOT NULL)"
            )
        except sqlite3.Error as exc:
            raise FeatureStoreError(f"cannot open {self.description}: {exc}") from exc

    async def fetch(self, keys: Sequence[str]) -> list[bytes | None]:
        found: dict[str, bytes] = {}
        try:
            for start in range(0, len(keys), _CHUNK):
                chunk = list(keys[start : start + _CHUNK])
                marks = ",".join("?" * len(chunk))
                for key, value in self._db.execute(
                    f"SELECT key, value FROM features WHERE key IN ({marks})", chunk
                ):
                    found[key] = value
        except sqlite3.Error as exc:
            raise FeatureStoreError(str(exc)) from exc
        return [found.get(k) for k in keys]

    async def write(self, items: Sequence[tuple[str, bytes]]) -> None:
        try:
            self._db.execute("BEGIN")
            self._db.executemany(
                "INSERT OR REPLACE INTO features (key, value) VALUES (?, ?)", items
            )
            self._db.execute("COMMIT")
        except sqlite3.Error as exc:
            raise FeatureStoreError(str(exc)) from exc

    async def ping(self) -> None:
        try:
            self._db.execute("SELECT 1")
        except sqlite3.Error as exc:
            raise FeatureStoreError(str(exc)) from exc

    async def close(self) -> None:
        self._db.close()
