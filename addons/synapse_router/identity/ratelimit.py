"""Token buckets: how many whoami calls for unknown tokens a process, and each client
address, may make. Memory is bounded: at most `max_clients` addresses are tracked (least
recently seen dropped first; a dropped address starts again with a full bucket)."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable


class TokenBucket:
    __slots__ = ("rate", "burst", "_level", "_at")

    def __init__(self, rate: float, burst: int, now: float) -> None:
        self.rate = rate
        self.burst = float(burst)
        self._level = float(burst)
        self._at = now

    def take(self, now: float) -> bool:
        """Take one token if there is one."""
        self._level = min(self.burst, self._level + (now - self._at) * self.rate)
        self._at = now
        if self._level < 1.0:
            return False
        self._level -= 1.0
        return True


class NewTokenLimiter:
    """A bucket for the whole process and one per client address; a call needs a token from
    both (the client's first, so one noisy address does not drain the process's bucket)."""

    def __init__(
        self,
        rate: float,
        burst: int,
        per_client_rate: float,
        per_client_burst: int,
        max_clients: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._clock = clock
        self._total = TokenBucket(rate, burst, clock())
        self._per_client_rate = per_client_rate
        self._per_client_burst = per_client_burst
        self._clients: OrderedDict[str, TokenBucket] = OrderedDict()
        self._max_clients = max_clients

    def allow(self, client: str) -> bool:
        now = self._clock()
        bucket = self._clients.get(client)
        if bucket is None:
            bucket = self._clients[client] = TokenBucket(self._per_client_rate, self._per_client_burst, now)
            if len(self._clients) > self._max_clients:
                self._clients.popitem(last=False)
        else:
            self._clients.move_to_end(client)
        return bucket.take(now) and self._total.take(now)

    def tracked_clients(self) -> int:
        return len(self._clients)
