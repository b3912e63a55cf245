"""The proxy's listening sockets as mitmproxy 12.3 and asyncio (CPython 3.12) hold them; each
use is run by a test against the installed versions (tests/unit/test_listen_backlog.py,
tests/unit/test_compat_listening.py):

 - mitmproxy's AsyncioServerInstance keeps its asyncio servers in a private `_servers` list,
   made by `asyncio.start_server(self.handle_stream, host, port)` (asyncio's backlog of 100);
 - `ServerInstance.handle_stream(reader, writer)` serves a connection (registering it in the
   Proxyserver's `connections`), whoever accepted it;
 - asyncio's selector loop accepts with `_accept_connection(factory, sock, sslcontext, server,
   backlog, ssl_handshake_timeout, ssl_shutdown_timeout)` registered by `_add_reader` on the
   listening socket, from the Server's `_loop`, `_sockets`, `_protocol_factory`,
   `_ssl_context`, `_ssl_handshake_timeout` and `_ssl_shutdown_timeout`;
 - after an accept that ran out of descriptors asyncio retries `_start_serving` 1 s later, and
   on a listener closed meanwhile that retry raises ValueError ("Invalid file descriptor: -1")
   reported as "Exception in callback ..._start_serving(...)".
"""

from __future__ import annotations

import asyncio
import socket
from asyncio import selector_events
from collections.abc import Callable
from typing import Any


def listening_servers(instance: Any) -> list[Any]:
    """The asyncio servers of one of mitmproxy's server instances: its private `_servers`
    (AsyncioServerInstance, mitmproxy 12.3)."""
    servers = getattr(instance, "_servers", None)
    return list(servers) if isinstance(servers, list) else []


def accept_per_wakeup(server: asyncio.Server, count: Callable[[], int]) -> bool:
    """Make the event loop accept up to `count()` connections each time the listening sockets
    of `server` (serving) are readable; asyncio fixes this at the backlog given when it started
    serving (100 for mitmproxy's servers). False where the loop is not asyncio's selector loop."""
    loop = getattr(server, "_loop", None)
    if not isinstance(loop, selector_events.BaseSelectorEventLoop) or not server.is_serving():
        return False
    accept = loop._accept_connection  # type: ignore[attr-defined]

    def on_readable(sock: socket.socket) -> None:
        # asyncio's own handler, with the arguments Server._start_serving gave it except the count.
        accept(
            server._protocol_factory,  # type: ignore[attr-defined]
            sock,
            server._ssl_context,  # type: ignore[attr-defined]
            server,
            count(),
            server._ssl_handshake_timeout,  # type: ignore[attr-defined]
            server._ssl_shutdown_timeout,  # type: ignore[attr-defined]
        )

    for sock in server._sockets:  # type: ignore[attr-defined]
        if sock.type == socket.SOCK_STREAM:
            loop._add_reader(sock.fileno(), on_readable, sock)  # type: ignore[attr-defined]  # swaps the callback
    return True


async def serve_accepted(instance: Any, conn: socket.socket) -> None:
    """Serve a connection accepted outside mitmproxy's listener as mitmproxy serves those its
    own listener accepts (`instance`: one of its server instances)."""
    try:
        reader, writer = await asyncio.open_connection(sock=conn)
    except OSError:
        conn.close()
        return
    await instance.handle_stream(reader, writer)


def closed_listener_retry(context: dict[str, Any]) -> bool:
    """Whether an event loop error is asyncio's retry of an accept on a listener closed since."""
    return isinstance(context.get("exception"), ValueError) and "._start_serving(" in context.get("message", "")
