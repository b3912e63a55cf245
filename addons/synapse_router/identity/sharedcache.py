"""An optional second-level identity cache in Redis, shared by every router process.

N router processes (or instances) each keep their own in-process cache; with this one behind
them a token costs one whoami call instead of N. Keys are `synapse-router:whoami:<sha256 hex>`,
never tokens; values are the user id, or "" for a token Synapse rejected; Redis expires them
with the same TTLs as the in-process cache.

Processes that miss the same token at the same instant also make one call between them: a
process that finds no value claims the call (`claim`: `SET synapse-router:whoami-lock:<hex> 1
NX PX <hold>`, read together with the value in one round trip). The winner asks whoami, then
stores the answer and drops the lock, in one round trip and in that order (`publish`), so a
process that sees the lock gone also sees the answer if there is one. A loser polls value and
lock in one round trip (`wait`: every 10 ms, growing to 50 ms) and takes the value as soon as
it appears; if the lock goes away without a value (the winner failed, or died and its lock
expired) or its wait runs out, it asks whoami itself, as it would without the lock. The caller
bounds both: the lock is held for the whoami timeout plus a margin, the wait lasts at most the
whoami timeout, so a winner that hangs or dies costs the others at most about one timeout of
waiting. The lock's value is not checked before it is dropped: a winner slower than its hold
may drop a later claimant's lock, but only after storing its own answer (or failing), so at
worst one more process asks whoami.

Redis is never in a request's way for long: every command has a short timeout, and after a
failure Redis is left alone for BACKOFF seconds (the router runs on its in-process cache and
says so once in its log and in `available`). A claim or a wait that meets a Redis failure
answers "no claim" / "no value", and the process asks whoami itself.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from enum import Enum
from urllib.parse import urlsplit

import redis.asyncio as redis_asyncio
from redis.exceptions import RedisError

log = logging.getLogger(__name__)

PREFIX = "synapse-router:whoami:"
LOCK_PREFIX = "synapse-router:whoami-lock:"
COMMAND_TIMEOUT = 0.25  # seconds; a cache that is slower than whoami is not worth waiting for
BACKOFF = 5.0
REJECTED = ""  # the value stored for a token Synapse rejected
POLL_FIRST = 0.01  # seconds between a waiting process's first polls for another's answer...
POLL_MAX = 0.05  # ...doubling up to this


class Claim(Enum):
    OURS = "ours"  # this process holds the claim: ask whoami, then publish()
    THEIRS = "theirs"  # another process is asking whoami: wait() for its answer


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
            await self._client.set(PREFIX + key.hex(), value, px=_ms(ttl))
        except (RedisError, OSError) as e:
            self._failed(e)
            return
        self._succeeded()

    async def claim(self, key: bytes, hold: float) -> Claim | str | None:
        """Claim the whoami call for `key` for `hold` seconds, reading the value in the same round
        trip. Returns the value if there is one now (REJECTED included), Claim.OURS, Claim.THEIRS,
        or None when Redis is unavailable (ask whoami; nobody waits for this process)."""
        if not self._usable():
            return None
        value_key, lock_key = PREFIX + key.hex(), LOCK_PREFIX + key.hex()
        try:
            async with self._client.pipeline(transaction=False) as pipe:
                # SET before GET: a winner stores its answer before dropping its lock, so a claim
                # that succeeds just after that drop still reads the answer here.
                pipe.set(lock_key, "1", nx=True, px=_ms(hold))
                pipe.get(value_key)
                won, value = await pipe.execute()
            if isinstance(value, str) and won:  # answered just before our claim: not ours to keep
                await self._client.delete(lock_key)
        except (RedisError, OSError) as e:
            self._failed(e)
            return None
        self._succeeded()
        if isinstance(value, str):
            return value
        return Claim.OURS if won else Claim.THEIRS

    async def wait(self, key: bytes, timeout: float) -> str | None:
        """Wait up to `timeout` seconds for the process holding the claim on `key` to publish its
        answer. Returns the value (REJECTED included), or None when the lock went away without a
        value, when `timeout` passed, or when Redis failed: then ask whoami."""
        value_key, lock_key = PREFIX + key.hex(), LOCK_PREFIX + key.hex()
        deadline = self._clock() + timeout
        interval = POLL_FIRST
        while (remaining := deadline - self._clock()) > 0:
            await asyncio.sleep(min(interval, remaining))
            interval = min(interval * 2, POLL_MAX)
            if not self._usable():
                return None
            try:
                value, lock = await self._client.mget(value_key, lock_key)
            except (RedisError, OSError) as e:
                self._failed(e)
                return None
            self._succeeded()
            if isinstance(value, str):
                return value
            if lock is None:
                return None
        return None

    async def publish(self, key: bytes, value: str | None, ttl: float) -> None:
        """End this process's claim on `key`: store `value` (if any) for `ttl` seconds, then drop
        the lock, in one round trip and in that order."""
        if not self._usable():
            return
        try:
            async with self._client.pipeline(transaction=False) as pipe:
                if value is not None and ttl > 0:
                    pipe.set(PREFIX + key.hex(), value, px=_ms(ttl))
                pipe.delete(LOCK_PREFIX + key.hex())
                await pipe.execute()
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


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))
