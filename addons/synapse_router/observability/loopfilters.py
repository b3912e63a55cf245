"""One exception handler on the event loop for every part of the router that drops or counts
some of the loop's error reports (ConnectionLimits: failed accepts for want of descriptors;
GracefulStop: accept retries on a closed listener). Parts add and remove their filters in any
order; the handler that was there before the first is restored when the last one goes (two
handlers chained by hand were restored in the wrong order at shutdown, leaving one installed)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

# A filter takes the loop's error context; True: handled (dropped or counted), not reported.
Filter = Callable[[dict[str, Any]], bool]


class LoopExceptionFilters:
    def __init__(self) -> None:
        self._filters: list[Filter] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._previous: Any = None  # the loop's handler before ours

    @property
    def installed(self) -> bool:
        return self._loop is not None

    def add(self, check: Filter) -> None:
        """Run `check` on the running loop's error reports from now on."""
        if check not in self._filters:
            self._filters.append(check)
        if self._loop is None:
            loop = asyncio.get_running_loop()
            self._loop, self._previous = loop, loop.get_exception_handler()
            loop.set_exception_handler(self._handle)

    def remove(self, check: Filter) -> None:
        if check in self._filters:
            self._filters.remove(check)
        if self._filters or self._loop is None:
            return
        if self._loop.get_exception_handler() == self._handle:  # nobody installed one after ours
            self._loop.set_exception_handler(self._previous)
        self._loop, self._previous = None, None

    def _handle(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        for check in list(self._filters):
            if check(context):
                return
        if self._previous is not None:
            self._previous(loop, context)
        else:
            loop.default_exception_handler(context)
