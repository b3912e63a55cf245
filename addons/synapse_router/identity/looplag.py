"""How late the event loop runs: a timer that asks to run every `interval` seconds and notes by
how much it ran late, while someone is watching (a whoami call in flight).

A flood that keeps the loop's CPU busy delays every callback, the whoami deadline's timer and
the read of whoami's answer included: a call cut by its deadline then says the loop was late,
not that main was slow (issue 20). The resolver asks `late_since(start)` for the total
lateness of the ticks since its call started and counts the call as main's failure only if the
call had a fair share of the timeout beyond it.

Memory is bounded: the last `keep` ticks are kept (at 0.05 s a tick, 51 s of history; a
window older than that reads the lateness of what is kept, never more).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable

INTERVAL = 0.05
KEEP = 1024


class LoopLag:
    def __init__(
        self, interval: float = INTERVAL, keep: int = KEEP, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.interval = interval
        self._clock = clock
        self._ticks: deque[tuple[float, float]] = deque(maxlen=keep)  # (ran at, lateness)
        self._watchers = 0
        self._timer: asyncio.TimerHandle | None = None
        self._due = 0.0

    def watch(self) -> None:
        """One more watcher; the timer runs while there is one (call in the running loop)."""
        self._watchers += 1
        if self._timer is None:
            self._schedule(asyncio.get_running_loop())

    def unwatch(self) -> None:
        self._watchers = max(0, self._watchers - 1)
        if self._watchers == 0 and self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def late_since(self, start: float) -> float:
        """The total lateness of the ticks that ran at or after `start` (0.0 if none): how much
        of the time since `start` the loop was behind. A call needs several loop turns (its
        write, its answer's head, its body), each late by about one tick's lateness under a
        flood, so the worst tick alone understates what the loop took from it (issue 20: calls
        cut "with 2.00 s left at start, loop late by 0.47 s" paused whoami under mitmdump)."""
        total = 0.0
        for ran_at, lateness in reversed(self._ticks):
            if ran_at < start:
                break
            total += lateness
        return total

    def worst_since(self, start: float) -> float:
        """The worst lateness of a tick that ran at or after `start` (0.0 if none)."""
        worst = 0.0
        for ran_at, lateness in reversed(self._ticks):
            if ran_at < start:
                break
            worst = max(worst, lateness)
        return worst

    def note(self, ran_at: float, lateness: float) -> None:
        """Record one tick (what the timer does; public for tests)."""
        self._ticks.append((ran_at, max(0.0, lateness)))

    def _schedule(self, loop: asyncio.AbstractEventLoop) -> None:
        self._due = self._clock() + self.interval
        self._timer = loop.call_later(self.interval, self._tick, loop)

    def _tick(self, loop: asyncio.AbstractEventLoop) -> None:
        now = self._clock()
        self.note(now, now - self._due)
        self._timer = None
        if self._watchers > 0:
            self._schedule(loop)
