"""ListenBacklog: the accept queue of the proxy's listening sockets (`limits.listen_backlog`).

mitmproxy listens with asyncio's default backlog of 100: a reconnect storm (every client of a
restarted router, or of a network blip, at once) overflows it, and the clients that overflow
fall into SYN back-off, seconds to minutes. Calling listen() again on a listening socket
changes its backlog (Linux), so this raises it on the sockets mitmproxy made, under both
launchers, whenever mitmproxy (re)starts its servers.
"""

from __future__ import annotations

import logging
import os
import socket
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


def listening_servers(instance: Any) -> list[Any]:
    """The asyncio servers of one of mitmproxy's server instances: its private `_servers`
    (AsyncioServerInstance, mitmproxy 12.3; tests/unit/test_mitmproxy_internals.py checks it)."""
    servers = getattr(instance, "_servers", None)
    return list(servers) if isinstance(servers, list) else []
