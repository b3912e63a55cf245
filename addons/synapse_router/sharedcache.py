"""An optional second-level identity cache in Redis, shared by every router process.

N router processes (or instances) each keep their own in-process cache; with this one behind
them a token costs one whoami call instead of N. Keys are `synapse-router:whoami:<sha256 hex>`,
never tokens; values are the user id, or "" for a token Synapse rejected; Redis expires them
with the same TTLs as the in-process cache.

Redis is never in a request's way for long: every command has a short timeout, and after a
failure Redis is left alone for BACKOFF seconds (the router runs on its in-process cache and
says so once in its log and in `available`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from urllib.parse import urlsplit

import redis.asyncio as redis_asyncio
from redis.exceptions import RedisError

log = logging.getLogger(__name__)

PREFIX = "synapse-router:whoami:"
COMMAND_TIMEOUT = 0.25  # seconds; a cache that is slower than whoami is not worth waiting for
BACKOFF = 5.0
REJECTED = ""  # the value stored for a token Synapse rejected


class SharedCache:
    def __init__(self, url: str, clock: Callable[[], float] = time.monotonic) -> None:
        parts = urlsplit(url)
        host = parts.hostname or ""
        # Shown in logs: without the password a redis:// URL may carry.
        self.url = parts._replace(netloc=f"{host}:{parts.port}" if parts.port else host).geturl()
        self._clock = clock
        self._client = redis_asyncio.from_url(
            url, socket_timeout=COMMAND_TIMEOUT, socket_connect_timeout=COMMAND_TIMEOUT, decode_responses=True
        )
        self._retry_at = 0.0
        self.available = True
        self.errors = 0

    async def get(self, key: bytes) -> str | None:
        """The cached user id, REJECTED, or None (unknown, or Redis unavailable)."""
        if not self._usable():
            return None
        try:
            value = await self._client.get(PREFIX + key.hex())
        except (RedisError, OSError) as e:
            self._failed(e)
            return None
        self._succeeded()
        return value if isinstance(value, str) else None

    async def put(self, key: bytes, value: str, ttl: float) -> None:
        if not self._usable() or ttl <= 0:
            return
        try:
            await self._client.set(PREFIX + key.hex(), value, px=max(1, int(ttl * 1000)))
        except (RedisError, OSError) as e:
            self._failed(e)
            return
        self._succeeded()

    async def delete(self, *keys: bytes) -> None:
        if not keys or not self._usable():
            return
        try:
            await self._client.delete(*(PREFIX + k.hex() for k in keys))
        except (RedisError, OSError) as e:
            self._failed(e)
            return
        self._succeeded()

    async def close(self) -> None:
        await self._client.aclose()

    def _usable(self) -> bool:
        return self.available or self._clock() >= self._retry_at

    def _failed(self, error: Exception) -> None:
        self.errors += 1
        self._retry_at = self._clock() + BACKOFF
        if self.available:
            self.available = False
            log.warning(
                f"synapse-router: shared identity cache {self.url} unavailable ({type(error).__name__}); "
                "running on the in-process cache"
            )

    def _succeeded(self) -> None:
        if not self.available:
            self.available = True
            log.info(f"synapse-router: shared identity cache {self.url} is back")
