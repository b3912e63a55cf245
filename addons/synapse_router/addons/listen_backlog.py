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
handler is registered again with `listen_backlog` per wake-up: each turn empties the queue,
and connections wait in the router (cheaply: a socket and a task) instead of in SYN back-off.
That re-registration uses asyncio's selector loop internals (Python 3.12;
tests/unit/test_mitmproxy_internals.py checks them); on another loop only the backlog is raised.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from asyncio import selector_events
from collections.abc import Callable
from typing import Any

from mitmproxy import ctx

from ..config import RouterConfig
from ..limits import LimitsConfig

log = logging.getLogger("synapse_router")


class ListenBacklog:
    def __init__(self) -> None:
        self.backlog = LimitsConfig().listen_backlog
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
        for instance in self._servers:
            for server in listening_servers(instance):
                for transport_socket in server.sockets:
                    if transport_socket.type != socket.SOCK_STREAM:
                        continue
                    with socket.socket(fileno=os.dup(transport_socket.fileno())) as listening:
                        listening.listen(self.backlog)
                accept_per_wakeup(server, self.backlog)


def listening_servers(instance: Any) -> list[Any]:
    """The asyncio servers of one of mitmproxy's server instances: its private `_servers`
    (AsyncioServerInstance, mitmproxy 12.3; tests/unit/test_mitmproxy_internals.py checks it)."""
    servers = getattr(instance, "_servers", None)
    return list(servers) if isinstance(servers, list) else []


def accept_per_wakeup(server: asyncio.Server, count: int) -> bool:
    """Make the event loop accept up to `count` connections each time the listening sockets of
    `server` (serving) are readable; asyncio fixes this at the backlog given when it started
    serving (100 for mitmproxy's servers). False where the loop is not asyncio's selector loop."""
    loop = getattr(server, "_loop", None)
    if not isinstance(loop, selector_events.BaseSelectorEventLoop) or not server.is_serving():
        return False
    server._backlog = count  # type: ignore[attr-defined]  # should it ever start serving again
    for sock in server._sockets:  # type: ignore[attr-defined]
        if sock.type != socket.SOCK_STREAM:
            continue
        # Replaces the reader asyncio registered in Server._start_serving, with the same
        # arguments except the count (`_add_reader` swaps the callback of a registered fd).
        loop._add_reader(  # type: ignore[attr-defined]
            sock.fileno(),
            loop._accept_connection,  # type: ignore[attr-defined]
            server._protocol_factory,  # type: ignore[attr-defined]
            sock,
            server._ssl_context,  # type: ignore[attr-defined]
            server,
            count,
            server._ssl_handshake_timeout,  # type: ignore[attr-defined]
            server._ssl_shutdown_timeout,  # type: ignore[attr-defined]
        )
    return True
