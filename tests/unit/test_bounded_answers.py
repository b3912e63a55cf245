"""Bounded answers on the router-sent path: the configuration keys, the long-poll allowance of
the read timeout, the buffer budget, and upstream_client + relay.py against scripted loopback
servers (a streamed answer relayed through the relay to a plain HTTP/1.1 client)."""

from __future__ import annotations

import asyncio
import hashlib

import h11
import pytest
from synapse_router.config import ConfigError, parse_config
from synapse_router.edge.limits import LimitsConfig, LimitsConfigError, parse_limits
from synapse_router.edge.relay import HEADER, Relay
from synapse_router.edge.upstream_client import (
    READ_HIGH,
    BufferBudget,
    Failure,
    NoResponse,
    StreamedAnswer,
    UpstreamClient,
)
from synapse_router.routing.retry import MAX_LONG_POLL, head_timeout
from synapse_router.routing.upstream import parse_upstream_url

from .test_upstream_client import HEADERS, OK, Server, answer

# --- configuration ---------------------------------------------------------------------------


def test_defaults_and_values() -> None:
    config = parse_config("workers: {}")
    assert config.limits.response_buffer == 256 * 1024
    assert config.limits.buffer_budget == 64 * 1024 * 1024
    assert config.health.read_timeout == 60.0
    config = parse_config("limits: {response_buffer: 0, buffer_budget: 1048576}\nhealth: {read_timeout: 5}\n")
    assert config.limits == LimitsConfig(response_buffer=0, buffer_budget=1048576)
    assert config.health.read_timeout == 5.0


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        ({"response_buffer": -1}, "response_buffer"),
        ({"response_buffer": "1M"}, "response_buffer"),
        ({"buffer_budget": 1.5}, "buffer_budget"),
        ({"buffer_budget": True}, "buffer_budget"),
    ],
)
def test_bad_buffer_values_name_the_key(raw: dict, key: str) -> None:
    with pytest.raises(LimitsConfigError) as info:
        parse_limits(raw)
    assert info.value.key == key
    assert "must be an integer >= 0" in info.value.reason


@pytest.mark.parametrize("value", ["0", "-1", ".nan", "'60s'"])
def test_bad_read_timeout_names_the_key(value: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(f"health: {{read_timeout: {value}}}\n")
    assert info.value.key == "health.read_timeout"


def test_head_timeout_adds_the_long_poll_the_client_asked_for() -> None:
    assert head_timeout("/_matrix/client/v3/sync?since=s&timeout=30000", 60) == 90
    assert head_timeout("/_matrix/client/v3/sync", 60) == 60
    assert head_timeout("/_matrix/client/v3/sync?timeout=-5", 60) == 60
    assert head_timeout("/_matrix/client/v3/sync?timeout=1e9", 60) == 60
    assert head_timeout("/x?timeout=" + "9" * 40, 60) == 60
    assert head_timeout("/x?timeout=999999999999", 60) == 60 + MAX_LONG_POLL


def test_budget_takes_and_gives() -> None:
    budget = BufferBudget(10)
    assert budget.take(6) and not budget.take(5) and budget.take(4)
    budget.give(10)
    assert budget.held == 0
    budget.give(3)
    assert budget.held == 0


# --- upstream_client and the relay --------------------------------------------------------------


def _pattern(n: int) -> bytes:
    return (bytes(range(256)) * (n // 256 + 1))[:n]


def _run(coro) -> None:  # type: ignore[no-untyped-def]
    asyncio.run(coro)


async def _through_relay(relay: Relay, answer_: StreamedAnswer) -> tuple[int, bytes, dict[bytes, bytes]]:
    """What a plain HTTP/1.1 client (h11) reads from the relay for the answer's ticket."""
    port = await relay.start()
    ticket = relay.hand(answer_)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    conn = h11.Connection(h11.CLIENT)
    request = h11.Request(
        method="POST", target="/x", headers=[("Host", "r"), (HEADER, ticket), ("Content-Length", "2")]
    )
    writer.write(conn.send(request) + conn.send(h11.Data(data=b"{}")) + conn.send(h11.EndOfMessage()))
    status, body, headers = 0, bytearray(), {}
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await reader.read(65536))
        elif isinstance(event, h11.Response):
            status, headers = event.status_code, dict(event.headers)
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            break
    writer.close()
    return status, bytes(body), headers


def test_a_long_answer_streams_through_the_relay_with_bounded_buffers() -> None:
    size = 8 * 1024 * 1024
    body = _pattern(size)
    chunked = b"".join(
        b"%x\r\n%s\r\n" % (len(body[i : i + 100000]), body[i : i + 100000]) for i in range(0, size, 100000)
    )
    raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-A: b\r\n\r\n" + chunked + b"0\r\n\r\n"

    async def main() -> None:
        server = Server(answer(raw))
        url = await server.start()
        client = UpstreamClient()
        client.set_buffers(64 * 1024, 1024 * 1024)
        got = await client.send(parse_upstream_url(url), "GET", "/", HEADERS, 1.0, read_timeout=5)
        assert isinstance(got, StreamedAnswer)
        assert got.response.headers.get("transfer-encoding") is None  # h11 frames it again
        assert client.budget.held <= 64 * 1024
        assert client.busy_connections(url) == 1
        # Not read while nobody asks: at most READ_HIGH and one read wait in it.
        await asyncio.sleep(0.2)
        assert len(got._connection.buffer) <= READ_HIGH + 256 * 1024
        relay = Relay()
        status, relayed, headers = await _through_relay(relay, got)
        assert status == 200 and headers[b"x-a"] == b"b"
        assert hashlib.sha256(relayed).digest() == hashlib.sha256(body).digest()
        assert client.budget.held == 0 and client.busy_connections(url) == 0
        assert client.idle_connections(url) == 1  # complete and well framed: kept
        assert relay.pending() == 0
        relay.close()
        await server.stop()

    _run(main())


def test_a_short_answer_is_held_whole_and_its_budget_given_back() -> None:
    async def main() -> None:
        server = Server(answer(OK))
        url = await server.start()
        client = UpstreamClient()
        got = await client.send(parse_upstream_url(url), "GET", "/", HEADERS, 1.0)
        assert not isinstance(got, StreamedAnswer) and got.content == b"{}"
        assert client.budget.held == 0
        client.set_buffers(1024, 0)  # budget spent: streamed from the head on
        got = await client.send(parse_upstream_url(url), "GET", "/", HEADERS, 1.0)
        assert isinstance(got, StreamedAnswer) and client.budget.refused == 1
        assert await got.next_chunk() == b"{}" and await got.next_chunk() is None
        await server.stop()

    _run(main())


def test_a_worker_that_never_answers_is_a_read_timeout_not_resent_on_a_fresh_connection() -> None:
    async def never(head: bytes) -> bytes | None:
        await asyncio.sleep(30)
        return None

    async def main() -> None:
        server = Server(never)
        url = await server.start()
        client = UpstreamClient()
        with pytest.raises(NoResponse) as info:
            await client.send(parse_upstream_url(url), "POST", "/", HEADERS, 1.0, b"{}", read_timeout=0.2)
        assert info.value.failure is Failure.READ_TIMEOUT
        assert server.connections == 1
        assert client.busy_connections(url) == 0
        await server.stop()

    _run(main())


def test_a_body_that_stalls_mid_stream_is_cut_after_the_read_timeout() -> None:
    async def stall(head: bytes) -> bytes | None:
        return b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n" + b"x" * 300000

    async def main() -> None:
        server = Server(stall)
        url = await server.start()
        client = UpstreamClient()
        client.set_buffers(1024, 1024)
        got = await client.send(parse_upstream_url(url), "GET", "/", HEADERS, 1.0, read_timeout=0.2)
        assert isinstance(got, StreamedAnswer)
        received = 0
        with pytest.raises(NoResponse) as info:
            while (chunk := await got.next_chunk()) is not None:
                received += len(chunk)
        assert info.value.failure is Failure.READ_TIMEOUT and received == 300000
        assert client.busy_connections(url) == 0 and client.idle_connections(url) == 0
        await server.stop()

    _run(main())


def test_close_reaches_an_exchange_that_is_not_resent_after_its_worker_was_found_dead() -> None:
    # abort(cut_busy=True) leaves a non-resendable request to finish, but no longer drops it
    # from the bookkeeping: close() (a shutdown) still ends it.
    async def never(head: bytes) -> bytes | None:
        await asyncio.sleep(30)
        return None

    async def main() -> None:
        server = Server(never)
        url = await server.start()
        client = UpstreamClient()
        task = asyncio.create_task(
            client.send(parse_upstream_url(url), "POST", "/", HEADERS, 1.0, b"{}", resendable=False)
        )
        await asyncio.sleep(0.2)
        assert client.abort(url, cut_busy=True) == 0
        assert client.busy_connections(url) == 1
        client.close()
        with pytest.raises(NoResponse):
            await asyncio.wait_for(task, 5)
        await server.stop()

    _run(main())


def test_an_unknown_ticket_gets_a_matrix_502_and_an_unclaimed_one_expires() -> None:
    async def main() -> None:
        relay = Relay()
        port = await relay.start()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET / HTTP/1.1\r\nHost: r\r\n" + HEADER.encode() + b": nope\r\n\r\n")
        data = await asyncio.wait_for(reader.read(), 5)
        assert data.startswith(b"HTTP/1.1 502 ") and b"M_UNKNOWN" in data
        writer.close()

        class Answer:
            head = h11.Response(status_code=200, headers=[])
            closed = False

            async def next_chunk(self) -> bytes | None:
                return None

            def close(self) -> None:
                self.closed = True

        a = Answer()
        ticket = relay.hand(a)
        assert relay.pending() == 1
        relay._expire(ticket.encode())
        assert a.closed and relay.pending() == 0
        relay.close()

    _run(main())
