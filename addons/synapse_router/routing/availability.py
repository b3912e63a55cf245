"""Which workers may take requests: health (up/down) and operator drain, keyed by worker URL.

Active checks count consecutive results: `fall` failures take a worker down, `rise` successes
bring it back. A passive failure (a refused, reset or timed-out connection) takes it down at
once; only active checks bring it back, so a flapping worker is not retried blindly.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class HealthConfig:
    path: str = "/health"
    interval: float = 5.0  # seconds between active checks of a worker
    timeout: float = 2.0  # seconds an active check may take
    fall: int = 2  # consecutive failed checks that take a worker down
    rise: int = 2  # consecutive good checks that bring it back
    connect_timeout: float = 2.0  # seconds to connect to a worker before failing over
    # Seconds the router waits for a worker's next bytes on a request it sent (nginx's
    # proxy_read_timeout); a long-poll's own `timeout` is added while it waits for the head.
    read_timeout: float = 60.0

    @property
    def retry_after(self) -> int:
        """Seconds a client is told to wait when no process can take its request: one round of
        checks, after which a worker may be back."""
        return max(1, math.ceil(self.interval))


@dataclass(slots=True)
class WorkerHealth:
    up: bool = True  # optimistic at start: checks begin at once
    drained: bool = False
    drained_by_config: bool = False  # drained because the configuration says so (not a command)
    failures: int = 0
    successes: int = 0
    reason: str = ""  # why it is down
    unreachable: bool = False  # down because its connections failed (refused, reset): not just slow
    changed_at: float = 0.0


class WorkerStates:
    def __init__(self, config: HealthConfig = HealthConfig(), clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self._clock = clock
        self.workers: dict[str, WorkerHealth] = {}
        self.unusable: frozenset[str] = frozenset()  # down or drained: what routing skips

    def track(self, urls: Iterable[str], drained: Iterable[str] = ()) -> None:
        """Follow exactly these workers, keeping the state of those already known. The
        configuration's drained workers are (again) drained; a worker the previous configuration
        drained and this one no longer does is back in rotation (a drain by command stays)."""
        wanted = set(urls)
        self.workers = {u: self.workers.get(u) or WorkerHealth(changed_at=self._clock()) for u in sorted(wanted)}
        config_drained = {u for u in drained if u in wanted}
        for url, health in self.workers.items():
            if url in config_drained:
                if not health.drained:
                    health.changed_at = self._clock()
                health.drained = health.drained_by_config = True
            elif health.drained_by_config:
                health.drained = health.drained_by_config = False
                health.changed_at = self._clock()
        self._refresh()

    def _refresh(self) -> None:
        self.unusable = frozenset(u for u, h in self.workers.items() if not h.up or h.drained)

    def record_check(self, url: str, ok: bool, reason: str = "", unreachable: bool = False) -> bool:
        """An active check's result (`unreachable`: the check's connection failed, it did not
        merely time out or answer an error); True when the worker changed state."""
        health = self.workers.get(url)
        if health is None:
            return False
        if ok:
            health.failures = 0
            health.successes += 1
            if not health.up and health.successes >= self.config.rise:
                return self._set(health, up=True, reason="")
        else:
            health.successes = 0
            health.failures += 1
            if health.up and health.failures >= self.config.fall:
                return self._set(health, up=False, reason=reason, unreachable=unreachable)
        return False

    def mark_down(self, url: str, reason: str) -> bool:
        """A passive failure: down at once. True when the worker changed state."""
        health = self.workers.get(url)
        if health is None:
            return False
        health.successes = 0
        return health.up and self._set(health, up=False, reason=reason, unreachable=True)

    def set_drained(self, url: str, drained: bool) -> bool:
        health = self.workers.get(url)
        if health is None:
            raise KeyError(url)
        health.drained_by_config = False  # a command decides now (until the next reload)
        if health.drained == drained:
            return False
        health.drained = drained
        health.changed_at = self._clock()
        self._refresh()
        return True

    def _set(self, health: WorkerHealth, up: bool, reason: str, unreachable: bool = False) -> bool:
        health.up = up
        health.reason = reason
        health.unreachable = unreachable and not up
        health.changed_at = self._clock()
        self._refresh()
        return True
