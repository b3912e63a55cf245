"""How many connections the router accepts per wake-up of a listening socket (listen_backlog.py,
with compat/listening.py's accept_per_wakeup run against the installed CPython's asyncio)."""

from __future__ import annotations

import asyncio
import socket
import subprocess

from synapse_router.addons.listen_backlog import accept_count
from synapse_router.compat.listening import accept_per_wakeup

QUEUED = 300


def accept_queue(port: int) -> int:
    """Connections waiting in the kernel's accept queue of the socket listening on `port`."""
    out = subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True, check=True).stdout
    return int(out.split()[1])


async def accepted_in_one_turn(count: int | None) -> int:
    """Queue QUEUED connections on a server made as mitmproxy makes its own (asyncio's
    defaults), let the loop run one turn that sees them, and count how many it accepted."""
    server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
    sock = server.sockets[0]
    port = sock.getsockname()[1]
    with socket.socket(fileno=sock.fileno()) as listening:  # the backlog, as ListenBacklog sets it
        listening.listen(4096)
        listening.detach()
    if count is not None:
        assert accept_per_wakeup(server, lambda: count)
    clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(QUEUED)]
    try:
        assert accept_queue(port) == QUEUED  # the loop has not run since: all still queued
        await asyncio.sleep(0)  # the turn that sees the socket readable runs its accept after us
        await asyncio.sleep(0)  # ... so after this one, exactly one accept has run
        return QUEUED - accept_queue(port)
    finally:
        for client in clients:
            client.close()
        server.close()


def test_asyncio_accepts_only_100_per_wakeup_by_default() -> None:
    # Why the router changes it: in a reconnect storm the loop's turns last a second or more.
    assert asyncio.run(accepted_in_one_turn(None)) == 100


def test_the_router_accepts_its_whole_backlog_per_wakeup() -> None:
    assert asyncio.run(accepted_in_one_turn(4096)) == QUEUED


def test_the_count_follows_the_connections_still_admitted() -> None:
    # A batch never runs the process out of the descriptors max_connections budgeted; at the
    # limit, asyncio's 100 (accepted to be closed at once, as without the router).
    assert asyncio.run(accepted_in_one_turn(accept_count(4096, 250))) == 250
    assert accept_count(4096, 10000) == 4096
    assert accept_count(4096, 0) == 100
    assert accept_count(50, 0) == 50
