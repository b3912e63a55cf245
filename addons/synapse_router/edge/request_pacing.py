"""Per-address request pacing (`limits.request_rate_per_address`,
`limits.request_burst_per_address`, `limits.request_delay_max`), as nginx's `limit_req` with a
burst: one client address sending requests as fast as the router answers them must not take
the event loop from everyone else.

A client's requests start at once while its address is within its burst; beyond, each waits
for its turn at the address's rate (a wait costs the router no CPU: the request's head is read,
nothing more is done until its turn); a request whose turn is more than `request_delay_max`
away is refused (429 `M_LIMIT_EXCEEDED` with `retry_after_ms`). Without pacing, 400 keep-alive
connections of one address, each sending its next request as soon as the last was answered,
keep 400 requests queued in the event loop, and every other client's request waits behind
all of them at each step of its exchange (issue 20: a new user's first sync took 2.4-14.5 s
with `whoami.timeout: 2`).

The address is the client's as the router attributes it (`X-Forwarded-For` from a trusted
proxy); a request whose address is itself a trusted proxy's is not paced.

The schedule is GCRA (the virtual-scheduling form of a token bucket): per address, the time
`due` at which its next request would start were it paced from empty; a request arriving at
`now` starts after `max(0, due - now - burst / rate)`. Memory is bounded: at most
`MAX_TRACKED` addresses are kept (least recently seen dropped; a dropped address starts again
with its whole burst, which is what it would have once idle for `burst / rate` seconds).

A request waits for its turn in `Turns`, which a graceful stop ends at once (`end_all`): the
router that takes over starts every address afresh, so the client is told to retry there.

Pure (no mitmproxy): addons/routing.py asks `admit` for each request head.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

MAX_TRACKED = 65536
_EPSILON = 1e-9  # seconds: a turn due this close to now (float rounding of the schedule) is now


@dataclass(frozen=True, slots=True)
class Admission:
    """What to do with one request: start after `delay` seconds (0.0: at once), or, if
    `refused`, answer 429 telling the client to retry after `retry_after` seconds."""

    delay: float = 0.0
    refused: bool = False
    retry_after: float = 0.0


NOW = Admission()


class RequestPacing:
    def __init__(
        self,
        rate: float = math.inf,
        burst: int = 1,
        delay_max: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._clock = clock
        self._due: OrderedDict[str, float] = OrderedDict()  # address -> its schedule's next start
        self.rate, self.burst, self.delay_max = rate, burst, delay_max

    def use(self, rate: float, burst: int, delay_max: float) -> None:
        """A new configuration (`rate` 0: not paced); a changed rate or burst starts every
        address afresh."""
        rate = rate if rate > 0.0 else math.inf
        if (rate, burst) != (self.rate, self.burst):
            self._due.clear()
        self.rate, self.burst, self.delay_max = rate, burst, delay_max

    def admit(self, address: str) -> Admission:
        if math.isinf(self.rate):
            return NOW
        now = self._clock()
        interval = 1.0 / self.rate
        due = self._due.get(address)
        if due is None or due < now:
            due = now
        else:
            self._due.move_to_end(address)
        delay = due - now - (self.burst - 1) * interval
        if delay > self.delay_max:
            # Not scheduled: the client is told when a request would start within the bound.
            return Admission(refused=True, retry_after=delay - self.delay_max)
        self._due[address] = due + interval
        if len(self._due) > MAX_TRACKED:
            self._due.popitem(last=False)
        return Admission(delay=delay) if delay > _EPSILON else NOW

    def tracked(self) -> int:
        return len(self._due)


class Turns:
    """The requests waiting for their turn: each wait ends at its turn (True), or earlier when
    `end_all` is called (False: the router is stopping)."""

    def __init__(self) -> None:
        self._waiting: dict[str, asyncio.Future[bool]] = {}

    async def wait(self, key: str, delay: float) -> bool:
        loop = asyncio.get_running_loop()
        turn: asyncio.Future[bool] = loop.create_future()
        timer = loop.call_later(delay, _settle, turn, True)
        self._waiting[key] = turn
        try:
            return await turn
        finally:
            timer.cancel()
            self._waiting.pop(key, None)

    def end_all(self) -> int:
        """End every wait now; the number ended."""
        ended = 0
        for turn in list(self._waiting.values()):
            ended += _settle(turn, False)
        return ended

    def __len__(self) -> int:
        return len(self._waiting)


def _settle(turn: asyncio.Future[bool], came: bool) -> bool:
    if turn.done():
        return False
    turn.set_result(came)
    return True
