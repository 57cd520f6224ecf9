"""Redis feature store: the only module that imports redis.

URLs: redis://[:password@]host:port/db, rediss:// (TLS), unix:///path/to/socket?db=0. redis-py's
pool reconnects by itself after a restart; every failure (refused, timeout, LOADING, auth) is
translated here into FeatureStoreError, which callers turn into UNAVAILABLE or defaults.
"""

from __future__ import annotations

from collections.abc import Sequence
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as aioredis
import redis.exceptions

from server.features.store import FeatureStoreError


def _redacted(url: str) -> str:
    parts = urlsplit(url)
    if parts.password:
        netloc = f"{parts.username or ''}:***@{parts.hostname}"
        if parts.port:
            netloc += f":{parts.port}"
        parts = parts._replace(netloc=netloc)
    return urlunsplit(parts)


class RedisFeatureStore:
    """Packed vectors in Redis; `fetch` is one MGET, `write` one pipelined MSET."""

    def __init__(
        self, url: str, *, socket_timeout_s: float = 0.5, max_connections: int = 16
    ) -> None:
        self.description = _redacted(url)
        self._client = aioredis.Redis.from_url(
            url,
            socket_timeout=socket_timeout_s,
            socket_connect_timeout=socket_timeout_s,
            max_connections=max_connections,
            health_check_interval=0,
            retry_on_timeout=False,
        )

    async def fetch(self, keys: Sequence[str]) -> list[bytes | None]:
        if not keys:
            return []
        try:
            return list(await self._client.mget(keys))  # type: ignore[arg-type]
        except redis.exceptions.RedisError as exc:
            raise FeatureStoreError(f"{type(exc).__name__}: {exc}") from exc
        except OSError as exc:
            raise FeatureStoreError(f"{type(exc).__name__}: {exc}") from exc

    async def write(self, items: Sequence[tuple[str, bytes]]) -> None:
        try:
            async with self._client.pipeline(transaction=False) as pipe:
                for start in range(0, len(items), 1000):
                    pipe.mset(dict(items[start : start + 1000]))
                await pipe.execute()
        except (redis.exceptions.RedisError, OSError) as exc:
            raise FeatureStoreError(f"{type(exc).__name__}: {exc}") from exc

    async def ping(self) -> None:
        try:
            await self._client.ping()
        except (redis.exceptions.RedisError, OSError) as exc:
            raise FeatureStoreError(f"{type(exc).__name__}: {exc}") from exc

    async def close(self) -> None:
        await self._client.aclose()
