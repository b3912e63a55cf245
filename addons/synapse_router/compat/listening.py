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
   `_ssl_context`, `_ssl_handshake_timeout` and `_ssl_shutdown_timeout`; it takes each
   connection with `sock.accept()` (ended by BlockingIOError) and only then makes a transport
   and a task for it, so a socket whose `accept()` closes some connections itself screens them
   before asyncio or mitmproxy spends anything on them (`ScreenedListener`);
 - after an accept that ran out of descriptors asyncio retries `_start_serving` 1 s later, and
   on a listener closed meanwhile that retry raises ValueError ("Invalid file descriptor: -1")
   reported as "Exception in callback ..._start_serving(...)";
 - the selector loop makes an accepted connection's transport one turn after accepting it
   (`_accept_connection2`, a task), and if the Server was closed in between, `Server._attach`
   asserts and the connection is dropped without a word: its client sees it closed or reset
   unanswered (`close_listener`; uvloop makes the transport as it accepts).
"""

from __future__ import annotations

import asyncio
import socket
import struct
from asyncio import selector_events
from collections.abc import Awaitable, Callable
from typing import Any

from ..edge.accept_queue import accept_waiting

TURNS_TO_ATTACH = 2  # loop turns for connections accepted already to get their transports
STREAM_READER_LIMIT = 2**16  # asyncio's default, which asyncio.start_server gives mitmproxy's servers


def listening_servers(instance: Any) -> list[Any]:
    """The asyncio servers of one of mitmproxy's server instances: its private `_servers`
    (AsyncioServerInstance, mitmproxy 12.3)."""
    servers = getattr(instance, "_servers", None)
    return list(servers) if isinstance(servers, list) else []


# A refused connection is closed with a reset (SO_LINGER 0): no FIN handshake, no TIME_WAIT
# socket left behind per refused connection of a churning client.
_RESET = struct.pack("ii", 1, 0)
# Refused connections closed in one accept() before it returns to the loop (which calls it
# again in its next turn if more wait): a churning client cannot hold the loop in one call.
MAX_REFUSED_PER_CALL = 1000


class ScreenedListener:
    """A listening socket as asyncio's accept handler uses it, whose `accept()` closes at once
    (a reset) every connection `refuse(peer_host)` names, and returns the next admitted one."""

    __slots__ = ("_sock", "_refuse")

    def __init__(self, sock: socket.socket, refuse: Callable[[str], bool]) -> None:
        self._sock = sock
        self._refuse = refuse

    def accept(self) -> tuple[socket.socket, Any]:
        for _ in range(MAX_REFUSED_PER_CALL):
            conn, addr = self._sock.accept()  # BlockingIOError once none waits: asyncio's end of a batch
            host = addr[0] if isinstance(addr, tuple) and addr and isinstance(addr[0], str) else ""
            if not host or not self._refuse(host):
                return conn, addr
            try:
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET)
            except OSError:
                pass
            conn.close()
        raise BlockingIOError("synapse-router: refused connections; the rest in the next turn")

    def fileno(self) -> int:
        return self._sock.fileno()

    def __getattr__(self, name: str) -> Any:  # family, type, getsockname, ... for asyncio's logs
        return getattr(self._sock, name)


def accept_per_wakeup(
    server: asyncio.Server, count: Callable[[], int], refuse: Callable[[str], bool] | None = None
) -> bool:
    """Make the event loop accept up to `count()` connections each time the listening sockets
    of `server` (serving) are readable; asyncio fixes this at the backlog given when it started
    serving (100 for mitmproxy's servers). With `refuse`, a connection whose peer address it
    names is closed as it is accepted (ScreenedListener), before any transport or task is made
    for it. False where the loop is not asyncio's selector loop (nothing is changed then)."""
    loop = getattr(server, "_loop", None)
    if not isinstance(loop, selector_events.BaseSelectorEventLoop) or not server.is_serving():
        return False
    accept = loop._accept_connection  # type: ignore[attr-defined]

    def on_readable(sock: socket.socket) -> None:
        # asyncio's own handler, with the arguments Server._start_serving gave it except the
        # count (and the socket, screened).
        accept(
            server._protocol_factory,  # type: ignore[attr-defined]
            ScreenedListener(sock, refuse) if refuse is not None else sock,
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


async def serve_accepted(
    handle: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[object]],
    conn: socket.socket,
    limit: int = STREAM_READER_LIMIT,
) -> None:
    """Serve a connection accepted outside a server's own listener (close_listener's) as the
    server serves those it accepts: `handle` is its client callback (for mitmproxy's, an
    instance's `handle_stream`), `limit` its StreamReader limit."""
    try:
        reader, writer = await asyncio.open_connection(sock=conn, limit=limit)
    except OSError:
        conn.close()
        return
    await handle(reader, writer)


async def close_listener(server: Any) -> list[socket.socket]:
    """Close a stream server (asyncio's or uvloop's) without losing a connection: the loop stops
    accepting on its sockets, the connections it accepted already get their transports (a turn
    later on the selector loop; closing first would drop them), the connections waiting in the
    sockets' queues are accepted (closing the listener would reset them while another router
    sharing the port serves), and only then is it closed. Returns those taken from the queues,
    for the caller to serve."""
    loop = asyncio.get_running_loop()
    sockets = [sock for sock in (getattr(server, "sockets", None) or ()) if sock.type == socket.SOCK_STREAM]
    if isinstance(loop, selector_events.BaseSelectorEventLoop):
        for sock in sockets:
            loop.remove_reader(sock.fileno())
        for _ in range(TURNS_TO_ATTACH):
            await asyncio.sleep(0)
    waiting = [conn for sock in sockets for conn in accept_waiting(sock.fileno())]
    server.close()  # right after the last accept: nothing runs in between
    return waiting


def closed_listener_retry(context: dict[str, Any]) -> bool:
    """Whether an event loop error is asyncio's retry of an accept on a listener closed since."""
    return isinstance(context.get("exception"), ValueError) and "._start_serving(" in context.get("message", "")
