"""Connecting to a worker within the connect timeout, judged by the kernel (connect.py)."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest
from synapse_router.edge.connect import open_socket


def test_a_connection_completed_while_the_loop_was_busy_is_not_a_timeout() -> None:
    # A router busy with a reconnect storm looks at its connects seconds late; the worker
    # answered the SYN at once, so this is a connection, not a connect timeout.
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]

        async def go() -> None:
            task = asyncio.create_task(open_socket("127.0.0.1", port, 0.05))
            await asyncio.sleep(0)  # the connect is under way
            time.sleep(0.3)  # the loop is stuck for six times the timeout; the worker is not
            sock = await task
            with sock:
                assert sock.getpeername() == ("127.0.0.1", port)

        asyncio.run(go())


def test_a_syn_unanswered_for_the_whole_timeout_is_a_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    async def black_hole(self: object, sock: socket.socket, address: object) -> None:
        await asyncio.sleep(60)  # a SYN nobody answers: the socket never connects

    monkeypatch.setattr(asyncio.selector_events.BaseSelectorEventLoop, "sock_connect", black_hole)

    async def go() -> None:
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            await open_socket("127.0.0.1", 9, 0.05)
        assert time.monotonic() - started < 5

    asyncio.run(go())


def test_a_refused_connection_is_an_os_error() -> None:
    with socket.socket() as bound:
        bound.bind(("127.0.0.1", 0))  # bound, not listening: connections are refused
        port = bound.getsockname()[1]

        async def go() -> None:
            with pytest.raises(ConnectionRefusedError):
                await open_socket("127.0.0.1", port, 1.0)

        asyncio.run(go())


def test_a_name_is_resolved() -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]

        async def go() -> None:
            with await open_socket("localhost", port, 2.0) as sock:
                assert sock.getpeername()[1] == port

        asyncio.run(go())
