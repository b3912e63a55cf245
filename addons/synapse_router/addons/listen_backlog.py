"""ListenBacklog: the accept queue of the proxy's listening sockets (`limits.listen_backlog`).

mitmproxy listens with asyncio's default backlog of 100: a reconnect storm (every client of a
restarted router, or of a network blip, at once) overflows it, and the clients that overflow
fall into SYN back-off, seconds to minutes. Calling listen() again on a listening socket
changes its backlog (Linux), so this raises it on the sockets mitmproxy made, under both
launchers, whenever mitmproxy (re)starts its servers.

The same 100 is also how many connections asyncio accepts per wake-up of the listening socket
(`_accept_connection(..., backlog)`, fixed when the server starts serving). In a storm the
router's loop runs in turns of a second or more, so at 100 per turn the kernel's queue fills
however large it is (measured: 8,000 connections within 2 s, tens of thousands of
ListenOverflows and a third or more of the clients unanswered; docs/benchmarks.md). So the accept
handler is registered again to take up to `listen_backlog` per wake-up, but no more than the
connections `limits.max_connections` still admits (at least asyncio's 100, as before: those
beyond the limit are accepted to be closed at once), so a batch never runs the process out of
descriptors that `2 x max_connections + 256` budgeted. Each turn empties the queue, and
connections wait in the router (cheaply: a socket and a task) instead of in SYN back-off.
That re-registration uses asyncio's selector loop internals (Python 3.12; compat/listening.py,
run by tests/unit/test_listen_backlog.py); on another loop only the backlog is raised.
The same handler screens each connection as it is accepted (`refuse`, the per-address bounds of
ConnectionLimits): one it refuses is reset at once, before asyncio makes a transport and a task
for it and before mitmproxy makes a connection handler and its layers, so a client churning
connections from one address costs an accept and a close each. Where the handler cannot be
replaced (another event loop), `screening(False)` tells ConnectionLimits to apply every bound
when mitmproxy reports the client instead.
After an accept failed for lack of descriptors, asyncio registers its own handler again with
the count of that moment, until the servers are re-made.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable
from typing import Any

from mitmproxy import ctx

from ..compat.listening import accept_per_wakeup, listening_servers
from ..config import RouterConfig
from ..edge.limits import LimitsConfig

log = logging.getLogger("synapse_router")


ASYNCIO_ACCEPT_COUNT = 100  # asyncio's default backlog, also its accept count per wake-up


def accept_count(backlog: int, headroom: int) -> int:
    """Connections to accept in one wake-up: the backlog, bounded by the connections the limits
    still admit, and never fewer than asyncio's own count."""
    return min(backlog, max(ASYNCIO_ACCEPT_COUNT, headroom))


class ListenBacklog:
    def __init__(
        self,
        headroom: Callable[[], int] | None = None,
        refuse: Callable[[str], bool] | None = None,
        screening: Callable[[bool], None] | None = None,
    ) -> None:
        """`headroom`: how many more client connections the router admits now; `refuse(host)`:
        whether a connection just accepted from that peer address is closed at once;
        `screening(on)`: told whether the listening sockets are screened with it."""
        self.backlog = LimitsConfig().listen_backlog
        self.headroom = headroom or (lambda: self.backlog)
        self.refuse = refuse
        self.screening = screening
        self._servers: Any = None  # mitmproxy's Servers, once running

    def prepare(self, config: RouterConfig) -> Callable[[], None]:
        def switch() -> None:
            self.backlog = config.limits.listen_backlog
            self.apply()

        return switch

    def running(self) -> None:
        proxyserver = ctx.master.addons.get("proxyserver")  # type: ignore[no-untyped-call]
        if proxyserver is None or self._servers is not None:
            return
        self._servers = proxyserver.servers
        self._servers.changed.connect(self._changed)
        self.apply()

    def done(self) -> None:
        if self._servers is not None:
            self._servers.changed.disconnect(self._changed)
            self._servers = None

    async def _changed(self) -> None:
        self.apply()

    def apply(self) -> None:
        """Set the backlog of every listening TCP socket of the proxy's servers."""
        if self._servers is None:
            return
        screened = True
        for instance in self._servers:
            for server in listening_servers(instance):
                for transport_socket in server.sockets:
                    if transport_socket.type != socket.SOCK_STREAM:
                        continue
                    with socket.socket(fileno=os.dup(transport_socket.fileno())) as listening:
                        listening.listen(self.backlog)
                count = lambda: accept_count(self.backlog, self.headroom())  # noqa: E731
                screened = accept_per_wakeup(server, count, self.refuse) and screened
        if self.screening is not None:
            self.screening(screened and self.refuse is not None)
