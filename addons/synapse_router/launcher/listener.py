"""One listening address at a time, moved by one serialised task: the metrics endpoint of a
router process and the merged one of the `--processes` parent.

Reloads ask for an address (`want`); a single task per listener brings the served address to
the last one asked for. A new server is published only once it is bound, and the old one is
stopped only then, so a new address that cannot be bound leaves the endpoint where it was
(asking for the same address again retries it). Asking twice in one loop turn (A -> B -> C)
ends on C with nothing left listening on B: the task reads the wish again after every await.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Protocol


class Server(Protocol):
    listen: str  # the address asked for

    @property
    def bound(self) -> str:
        """The address it serves once started (another port than `listen`'s: see `_settle`)."""
        ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


class SwitchedListener:
    """Serves what `make(listen)` builds on the address last asked for by `want`."""

    def __init__(
        self,
        make: Callable[[str], Server],
        warn: Callable[[str], None],
        info: Callable[[str], None] = lambda _message: None,
        what: str = "metrics",
    ) -> None:
        self._make = make
        self._warn = warn
        self._info = info
        self._what = what
        self.server: Server | None = None  # bound and serving: published only once bound
        self._wanted: str | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def listen(self) -> str | None:
        """The address served now (None: none)."""
        return self.server.listen if self.server is not None else None

    def want(self, listen: str | None) -> None:
        """Serve on `listen` from now on (None: stop serving). Call on the listener's loop."""
        self._wanted = listen
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._settle(), name=f"{self._what} listener")

    async def settled(self) -> None:
        """Wait until the last wish was acted on (bound, refused or stopped)."""
        while self._task is not None and not self._task.done():
            await asyncio.shield(self._task)

    async def close(self) -> None:
        """Stop serving, after the move in progress if any."""
        self._wanted = None
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._settle(), name=f"{self._what} listener")
        await self.settled()

    async def _settle(self) -> None:
        refused: set[str] = set()  # refused in this run: asked for again later, tried again
        while self._wanted != self.listen and self._wanted not in refused:
            wanted = self._wanted
            if wanted is None:
                old, self.server = self.server, None
                if old is not None:
                    await old.stop()
                continue
            new = self._make(wanted)
            try:
                await new.start()
            except OSError as e:
                where = f"they stay on http://{self.server.bound}/metrics" if self.server is not None else "none served"
                self._warn(f"cannot serve {self._what} on {wanted}: {e.strerror or e}; {where}")
                refused.add(wanted)
                continue
            old, self.server = self.server, new
            self._info(self._served(wanted, new.bound))
            if old is not None:
                await old.stop()

    def _served(self, wanted: str, bound: str) -> str:
        """The line saying where it serves. Its bound port differs from the one asked for when
        that was 0 (ephemeral), or in a `--processes` child, whose event loop serves process i's
        own metrics on P + i while the parent serves all of them merged on P (childprocess.py)."""
        if bound == wanted or wanted.endswith(":0"):
            return f"{self._what} on http://{bound}/metrics"
        return (
            f"{self._what} of this process alone on http://{bound}/metrics "
            f"(the --processes parent serves every process's merged on {wanted} if it can bind it, and says so)"
        )
