"""Behavioural tests of compat.listening.close_listener against the installed Python: a
connection the loop has just accepted when a stop closes the listener must still be served
(CPython 3.12's selector loop drops it otherwise), and one waiting in the queue is returned.
"""

from __future__ import annotations

import asyncio
import gc
import socket
from collections.abc import Awaitable, Callable

from synapse_router.compat.listening import close_listener, serve_accepted

ANSWER = b"answered\n"


async def _serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.readline()
    writer.write(ANSWER)
    await writer.drain()
    writer.close()


def _client(port: int) -> socket.socket:
    """A client whose connection is complete (in the listener's queue) and whose request is sent."""
    client = socket.create_connection(("127.0.0.1", port))
    client.sendall(b"ping\n")
    client.setblocking(False)
    return client


async def _answer(client: socket.socket) -> bytes:
    """What the client got before its connection ended (b"" for closed unanswered)."""
    loop = asyncio.get_running_loop()
    received = b""
    async with asyncio.timeout(5):
        while True:
            try:
                chunk = await loop.sock_recv(client, 1024)
            except ConnectionResetError:
                break
            if not chunk:
                break
            received += chunk
    client.close()
    return received


async def _close_right_after_an_accept(close: Callable[[asyncio.Server], Awaitable[object]]) -> bytes:
    """Accept a connection in the loop turn right before the one `close` starts in, as a stop
    scheduled one turn earlier meets a probe's connection: the turn that runs the stop's step
    runs the accepted connection's transport-making task after it."""
    loop = asyncio.get_running_loop()
    server = await asyncio.start_server(_serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = _client(port)
    closed = asyncio.Event()

    def start_closing() -> None:  # runs before the accept handler, in the turn that accepts
        async def run() -> None:
            await close(server)
            closed.set()

        asyncio.ensure_future(run())

    loop.call_soon(start_closing)
    await closed.wait()
    for _ in range(5):
        await asyncio.sleep(0)
    gc.collect()  # a dropped connection's socket sits in a reference cycle until then
    answer = await _answer(client)
    await server.wait_closed()
    return answer


async def _plain_close(server: asyncio.Server) -> None:
    server.close()


async def _close_listener_serving_the_queue(server: asyncio.Server) -> None:
    await asyncio.gather(*(serve_accepted(_serve, conn) for conn in await close_listener(server)))


def test_cpython_drops_a_connection_accepted_in_the_turn_before_close() -> None:
    """What close_listener is for: when this fails, the installed Python no longer drops it."""
    assert asyncio.run(_close_right_after_an_accept(_plain_close)) == b""


def test_close_listener_lets_an_accepted_connection_be_answered() -> None:
    assert asyncio.run(_close_right_after_an_accept(_close_listener_serving_the_queue)) == ANSWER


def test_close_listener_returns_the_connections_waiting_in_the_queue_and_closes() -> None:
    async def scenario() -> tuple[list[bytes], bool, bool]:
        server = await asyncio.start_server(_serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        # Taken out of the loop's hands before it ever looks: they stay in the kernel's queue.
        for sock in server.sockets:
            asyncio.get_running_loop().remove_reader(sock.fileno())
        clients = [_client(port) for _ in range(3)]
        waiting = await close_listener(server)
        served = [asyncio.create_task(serve_accepted(_serve, conn)) for conn in waiting]
        answers = [await _answer(c) for c in clients]
        await asyncio.gather(*served)
        refused = False
        try:
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
        except ConnectionRefusedError:
            refused = True
        return answers, server.is_serving(), refused

    answers, serving, refused = asyncio.run(scenario())
    assert answers == [ANSWER] * 3
    assert not serving and refused


def test_under_uvloop_an_accepted_connection_is_answered_either_way() -> None:
    """uvloop makes the transport as it accepts: nothing to drop, and close_listener (which
    leaves its accept handler alone) still answers what waits."""
    import uvloop

    assert uvloop.run(_close_right_after_an_accept(_plain_close)) == ANSWER
    assert uvloop.run(_close_right_after_an_accept(_close_listener_serving_the_queue)) == ANSWER
