"""compat/connections.py and compat/listening.py against a real mitmproxy Proxyserver serving on
loopback (the installed mitmproxy 12.3 and CPython): a live client connection is found with
its reader, writer and task, written to, closed; an incomplete head over the limit is answered
431; a connection accepted outside mitmproxy's listener is served and registered like the
others; asyncio's retry on a closed listener is recognised."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from typing import Any

import pytest
from mitmproxy.addons.next_layer import NextLayer
from mitmproxy.addons.proxyserver import Proxyserver
from mitmproxy.test import taddons
from synapse_router.compat import connections, listening


class Guarding:
    """What ConnectionLimits does: guard each client's head from its `client_connected` hook,
    before mitmproxy reads the connection."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.closed: list[str] = []

    def client_connected(self, client: Any) -> None:
        connections.HeadGuard.install(client.id, self.limit, self.closed.append)


@contextlib.asynccontextmanager
async def serving(*addons: Any) -> AsyncIterator[tuple[Proxyserver, Any, int]]:
    """A Proxyserver in reverse mode on a free loopback port (its upstream refuses: nothing
    here reaches it), with `addons` after it; yields it, its server instance and the port."""
    proxyserver = Proxyserver()  # type: ignore[no-untyped-call]
    with taddons.context(proxyserver, NextLayer(), *addons) as tctx:
        tctx.options.update(mode=["reverse:http://127.0.0.1:9@127.0.0.1:0"], connection_strategy="lazy")
        assert await proxyserver.setup_servers()
        instance = next(iter(proxyserver.servers))
        port = instance.listen_addrs[0][1]
        try:
            yield proxyserver, instance, port
        finally:
            await proxyserver.servers.update([])


async def wait_until(predicate: Any, what: str) -> None:
    for _ in range(500):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise TimeoutError(what)


async def connect(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port)


async def test_a_live_client_connection_is_found_written_to_and_closed() -> None:
    async with serving() as (proxyserver, _, port):
        reader, writer = await connect(port)
        await wait_until(lambda: len(proxyserver.connections) == 1, "the connection registered")
        assert connections.open_connections() == 1
        (client_id,) = list(proxyserver.connections)
        io = connections.client_io(client_id)
        assert io is not None and isinstance(io.handler, asyncio.Task)
        assert isinstance(io.reader, asyncio.StreamReader) and isinstance(io.writer, asyncio.StreamWriter)
        assert connections.unsent_bytes(io) == 0
        io.writer.write(b"written outside a flow")
        assert await reader.readexactly(22) == b"written outside a flow"
        connections.close_client(io, "test")
        assert await asyncio.wait_for(reader.read(), 10) == b""  # closed cleanly, no page
        await wait_until(lambda: connections.open_connections() == 0, "the connection unregistered")
        assert connections.client_io(client_id) is None
        writer.close()


async def test_an_incomplete_head_over_the_limit_is_answered_431() -> None:
    guarding = Guarding(1024)
    async with serving(guarding) as (proxyserver, _, port):
        reader, writer = await connect(port)
        await wait_until(lambda: len(proxyserver.connections) == 1, "the connection registered")
        (client_id,) = list(proxyserver.connections)
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n")
        await writer.drain()
        await asyncio.sleep(0.1)
        writer.write(b"X-Long: " + b"a" * 2048 + b"\r\n")  # no blank line: the head never ends
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 10)
        assert answer.startswith(b"HTTP/1.1 431 ") and b"M_TOO_LARGE" in answer
        assert guarding.closed == [client_id]
        writer.close()


async def test_a_connection_that_sent_nothing_is_told_from_one_that_sent_a_byte() -> None:
    async with serving(Guarding(1024)) as (proxyserver, _, port):
        _, silent = await connect(port)
        _, talking = await connect(port)
        await wait_until(lambda: len(proxyserver.connections) == 2, "the connections registered")
        by_peer = {handler.client.peername: client_id for client_id, handler in proxyserver.connections.items()}
        silent_id = by_peer[silent.get_extra_info("sockname")]
        talking_id = by_peer[talking.get_extra_info("sockname")]
        await asyncio.sleep(0.1)
        assert connections.nothing_received(silent_id) and connections.nothing_received(talking_id)
        talking.write(b"G")  # one byte of a head: no longer silent, read by mitmproxy or not
        await talking.drain()
        await wait_until(lambda: not connections.nothing_received(talking_id), "the byte seen")
        await asyncio.sleep(0.1)
        assert connections.nothing_received(silent_id)
        assert not connections.nothing_received("no such connection")
        silent.close()
        talking.close()


class Holding:
    """Holds each request's connection from its `requestheaders` hook (what Routing does while a
    request waits for its turn) and notes, a moment later, what the router has taken in of its
    body meanwhile: the bytes in the client's StreamReader, and whether its transport reads."""

    def __init__(self, pause: bool) -> None:
        self.pause = pause
        self.seen: list[tuple[int, bool]] = []

    async def requestheaders(self, flow: Any) -> None:
        resume = connections.hold_reading(flow.client_conn.id, pause=self.pause)
        await asyncio.sleep(0.3)
        io = connections.client_io(flow.client_conn.id)
        self.seen.append((io.reader.buffered(), io.writer.transport.is_reading()))
        resume()


@pytest.mark.parametrize("pause", [True, False])
async def test_a_held_connection_takes_in_little_and_reads_on_after(pause: bool) -> None:
    """Held with `pause` (a request with a body), the transport stops reading: of a 1 MB body
    sent with its head, at most one read (64 KiB) waits in the router, the rest in the kernel.
    Held without (a request without one: its client's close is seen at once), the socket is
    read, but the reader's flow control pauses it past twice HOLD_LIMIT, not twice 64 KiB: of a
    request pipelined behind the held one, at most one read waits in the router too. Before, a waiting upload cost
    about 490 KB. After the hold, the body is read whole (the upstream, which refuses, then
    fails the request: a 502; the GET's 502 closes its connection before the pipelined request
    is read)."""
    holding = Holding(pause)
    async with serving(Guarding(65536), holding) as (_, _, port):
        reader, writer = await connect(port)
        body = b"x" * 1_000_000
        if pause:
            writer.write(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        else:
            pipelined = b"PUT / HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body) + body
            writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + pipelined)
        await wait_until(lambda: holding.seen, "the hold over")
        buffered, reading = holding.seen[0]
        assert buffered <= connections.READ_SIZE and not reading
        if pause:  # read on: the whole body, then the refusing upstream's 502
            status_line = await asyncio.wait_for(reader.readuntil(b"\r\n"), 10)
            assert status_line.startswith(b"HTTP/1.1 502 "), status_line
        writer.close()


async def test_a_connection_accepted_outside_the_listener_is_served_and_registered() -> None:
    async with serving() as (proxyserver, instance, port):
        servers = listening.listening_servers(instance)
        assert servers and all(isinstance(server, asyncio.Server) for server in servers)
        assert [s.getsockname()[1] for server in servers for s in server.sockets] == [port]
        with socket.create_server(("127.0.0.1", 0)) as other:  # a listener that is not mitmproxy's
            ours = socket.create_connection(other.getsockname())
            theirs, _ = other.accept()
        task = asyncio.get_running_loop().create_task(listening.serve_accepted(instance.handle_stream, theirs))
        await wait_until(lambda: len(proxyserver.connections) == 1, "the connection registered")
        ours.close()
        await asyncio.wait_for(task, 10)
        assert len(proxyserver.connections) == 0


def test_asyncio_retry_on_a_closed_listener_is_recognised() -> None:
    """After accept() ran out of descriptors CPython 3.12 retries `_start_serving` 1 s later;
    on a listener closed meanwhile that retry raises ValueError, reported as this context."""
    loop = asyncio.new_event_loop()
    reported: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: reported.append(context))
    try:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        sock.close()  # closed before the retry runs: fileno() is -1

        def factory() -> asyncio.Protocol:
            return asyncio.Protocol()

        loop.call_soon(loop._start_serving, factory, sock)  # type: ignore[attr-defined]
        loop.run_until_complete(asyncio.sleep(0.05))
    finally:
        loop.close()
    assert len(reported) == 1 and listening.closed_listener_retry(reported[0])
    assert not listening.closed_listener_retry({"exception": ValueError("x"), "message": "something else"})
