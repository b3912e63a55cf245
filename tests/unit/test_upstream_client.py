"""The router's own HTTP/1.1 client (upstream_client.py) against scripted loopback servers."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import pytest
from mitmproxy import http
from synapse_router.edge.upstream_client import (
    BadRequest,
    Failure,
    NoResponse,
    UpstreamClient,
    request_headers,
)
from synapse_router.routing.upstream import parse_upstream_url

# Given the request head, answer with bytes; None: close without answering.
Script = Callable[[bytes], Awaitable[bytes | None]]


@dataclass
class Server:
    script: Script
    close_after: bool = False  # close the connection after each answer
    connections: int = 0
    requests: list[bytes] = field(default_factory=list)
    server: asyncio.Server | None = None

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                self.requests.append(head)
                answer = await self.script(head)
                if answer is None:
                    break
                writer.write(answer)
                await writer.drain()
                if self.close_after:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()


def answer(raw: bytes) -> Script:
    async def script(head: bytes) -> bytes:
        return raw

    return script


OK = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"
HEADERS = [(b"Host", b"matrix.example"), (b"Authorization", b"Bearer t")]


def run(coro: Awaitable[None]) -> None:
    asyncio.run(coro)  # type: ignore[arg-type]


async def send(
    client: UpstreamClient, url: str, method: str = "GET", headers: list[tuple[bytes, bytes]] = HEADERS
) -> http.Response:
    return await client.send(parse_upstream_url(url), method, "/_matrix/client/v3/sync?timeout=1", headers, 1.0)


def test_content_length_response_and_keep_alive() -> None:
    async def go() -> None:
        server = Server(answer(OK))
        url = await server.start()
        client = UpstreamClient()
        first = await send(client, url)
        second = await send(client, url)
        assert (first.status_code, first.reason, first.raw_content) == (200, "OK", b"{}")
        assert first.headers.fields == (
            (b"Content-Type", b"application/json"),
            (b"Content-Length", b"2"),
        )
        assert second.raw_content == b"{}"
        assert server.connections == 1  # the second request reused the first connection
        assert client.idle_connections(url) == 1
        assert server.requests[0] == (
            b"GET /_matrix/client/v3/sync?timeout=1 HTTP/1.1\r\nHost: matrix.example\r\nAuthorization: Bearer t\r\n\r\n"
        )  # exactly the client's headers: no Accept-Encoding, User-Agent or Connection added
        client.close()
        await server.stop()

    run(go())


def test_chunked_body_is_joined_and_given_a_length() -> None:
    raw = (
        b'HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nETag: "abc"\r\n\r\n'
        b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: dropped\r\n\r\n"
    )

    async def go() -> None:
        server = Server(answer(raw))
        url = await server.start()
        client = UpstreamClient()
        response = await send(client, url)
        assert response.raw_content == b"hello world"
        assert response.headers.fields == ((b"ETag", b'"abc"'), (b"content-length", b"11"))
        assert client.idle_connections(url) == 1
        client.close()
        await server.stop()

    run(go())


def test_head_answer_is_not_given_a_length_of_zero() -> None:
    # A HEAD answer describes the GET's body without carrying it: no Content-Length: 0 invented.
    async def go() -> None:
        server = Server(answer(b'HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nETag: "abc"\r\n\r\n'))
        url = await server.start()
        client = UpstreamClient()
        response = await send(client, url, method="HEAD")
        assert response.raw_content == b"" and response.headers.fields == ((b"ETag", b'"abc"'),)
        client.close()
        await server.stop()

    run(go())


def test_close_delimited_body_and_http10_are_not_reused() -> None:
    async def go() -> None:
        server = Server(answer(b"HTTP/1.0 200 OK\r\nX-A: 1\r\n\r\nuntil the end"), close_after=True)
        url = await server.start()
        client = UpstreamClient()
        response = await send(client, url)
        assert response.raw_content == b"until the end"
        assert (b"content-length", b"13") in response.headers.fields
        assert client.idle_connections(url) == 0
        await send(client, url)
        assert server.connections == 2
        await server.stop()

    run(go())


def test_connection_close_is_honoured() -> None:
    async def go() -> None:
        server = Server(answer(b"HTTP/1.1 200 OK\r\nConnection: keep-alive, close\r\nContent-Length: 0\r\n\r\n"))
        url = await server.start()
        client = UpstreamClient()
        response = await send(client, url)
        assert response.headers.fields == ((b"Content-Length", b"0"),)  # hop-by-hop Connection removed
        assert client.idle_connections(url) == 0
        await server.stop()

    run(go())


@pytest.mark.parametrize(
    ("method", "raw"),
    [
        ("HEAD", b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n"),
        ("GET", b'HTTP/1.1 304 Not Modified\r\nETag: "x"\r\n\r\n'),
        ("GET", b"HTTP/1.1 204 No Content\r\n\r\n"),
    ],
)
def test_bodiless_responses_do_not_wait_for_a_body(method: str, raw: bytes) -> None:
    async def go() -> None:
        server = Server(answer(raw))
        url = await server.start()
        client = UpstreamClient()
        response = await asyncio.wait_for(send(client, url, method), 5)
        assert response.raw_content == b""
        assert client.idle_connections(url) == 1
        client.close()
        await server.stop()

    run(go())


def test_informational_responses_are_skipped() -> None:
    async def go() -> None:
        server = Server(answer(b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n" + OK))
        url = await server.start()
        client = UpstreamClient()
        response = await send(client, url)
        assert (response.status_code, response.raw_content) == (200, b"{}")
        client.close()
        await server.stop()

    run(go())


def test_host_is_added_when_the_client_sent_none() -> None:
    async def go() -> None:
        server = Server(answer(OK))
        url = await server.start()
        client = UpstreamClient()
        await send(client, url, headers=[(b"Authorization", b"Bearer t")])
        port = url.rsplit(":", 1)[1]
        assert f"\r\nHost: 127.0.0.1:{port}\r\n".encode() in server.requests[0]
        client.close()
        await server.stop()

    run(go())


def test_idle_connection_closed_by_the_worker_is_replaced() -> None:
    async def go() -> None:
        server = Server(answer(OK), close_after=True)  # answers keep-alive, then closes anyway
        url = await server.start()
        client = UpstreamClient()
        await send(client, url)
        await asyncio.sleep(0.05)  # the close reaches the client; reuse sees it and reconnects
        await send(client, url)
        assert server.connections == 2
        await server.stop()

    run(go())


def test_worker_closing_a_reused_connection_mid_request_gets_one_fresh_try() -> None:
    answers = [OK, None, OK]  # second request: the connection closes with no answer

    async def script(head: bytes) -> bytes | None:
        return answers.pop(0)

    async def go() -> None:
        server = Server(script)
        url = await server.start()
        client = UpstreamClient()
        await send(client, url)
        response = await send(client, url)
        assert response.raw_content == b"{}"
        assert (server.connections, len(server.requests)) == (2, 3)
        client.close()
        await server.stop()

    run(go())


def test_refused_connection_is_a_connect_error() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: connections are refused

        async def go() -> None:
            with pytest.raises(NoResponse) as caught:
                await send(UpstreamClient(), f"http://127.0.0.1:{port}")
            assert caught.value.failure is Failure.CONNECT_ERROR

        run(go())


@pytest.mark.parametrize(
    "raw",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort",  # closed before the whole body
        b"SSH-2.0-OpenSSH\r\n\r\n",  # not HTTP
        b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX-A: b\rSet-Cookie: x=y\r\nContent-Length: 2\r\n\r\n{}",  # a bare CR relayed
        b"HTTP/1.1 200 OK\r\nX-A: b\x00c\r\nContent-Length: 2\r\n\r\n{}",
        b"HTTP/1.1 200 O\x00K\r\nContent-Length: 2\r\n\r\n{}",
        b"HTTP/1.1 200 OK\r\nX A: b\r\nContent-Length: 2\r\n\r\n{}",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n",
        b"\r\n\r\n",
    ],
)
def test_broken_responses_are_no_response(raw: bytes) -> None:
    async def go() -> None:
        server = Server(answer(raw), close_after=True)
        url = await server.start()
        client = UpstreamClient()
        with pytest.raises(NoResponse) as caught:
            await asyncio.wait_for(send(client, url), 5)
        assert caught.value.failure is Failure.NO_RESPONSE
        assert client.idle_connections(url) == 0
        await server.stop()

    run(go())


def test_a_response_cut_short_is_described_from_the_routers_side() -> None:
    """Logged as the failover reason: what happened, not h11's words ("role=SERVER")."""

    async def go() -> None:
        server = Server(answer(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort"), close_after=True)
        url = await server.start()
        with pytest.raises(NoResponse) as caught:
            await asyncio.wait_for(send(UpstreamClient(), url), 5)
        assert str(caught.value).endswith("the worker closed the connection before a complete response")
        await server.stop()

    run(go())


def test_abort_releases_waiting_requests_and_does_not_resend() -> None:
    async def go() -> None:
        hold = asyncio.Event()

        async def script(head: bytes) -> bytes | None:
            await hold.wait()  # a wedged worker
            return OK

        server = Server(script)
        url = await server.start()
        client = UpstreamClient()
        waiting = [asyncio.ensure_future(send(client, url)) for _ in range(3)]
        while len(server.requests) < 3:
            await asyncio.sleep(0.01)
        assert client.abort(url) == 3
        for task in waiting:
            with pytest.raises(NoResponse) as caught:
                await asyncio.wait_for(task, 5)
            assert caught.value.failure is Failure.NO_RESPONSE
            assert "health checks found the worker dead" in str(caught.value)  # not "the worker closed"
        assert len(server.requests) == 3  # given up on, not resent to the dead worker
        hold.set()
        await server.stop()

    run(go())


def test_abort_leaves_a_request_that_will_not_be_resent_to_finish() -> None:
    # A POST is never resent: cutting it when the health checks call its worker dead would turn
    # a slow worker's late answer into an error. It finishes; its connection is not kept.
    async def go() -> None:
        hold = asyncio.Event()

        async def script(head: bytes) -> bytes | None:
            await hold.wait()
            return OK

        server = Server(script)
        url = await server.start()
        client = UpstreamClient()
        upstream = parse_upstream_url(url)
        once = asyncio.ensure_future(client.send(upstream, "POST", "/x", HEADERS, 1.0, b"{}", resendable=False))
        resent = asyncio.ensure_future(send(client, url))
        while len(server.requests) < 2:
            await asyncio.sleep(0.01)
        assert client.abort(url) == 1  # only the resendable one
        with pytest.raises(NoResponse):
            await asyncio.wait_for(resent, 5)
        hold.set()
        answer = await asyncio.wait_for(once, 5)
        assert answer.status_code == 200
        assert client.idle_connections(url) == 0  # the worker was found dead: not kept
        await server.stop()

    run(go())


def test_request_headers_drop_hop_by_hop() -> None:
    given = [(b"Host", b"h"), (b"Connection", b"keep-alive"), (b"TE", b"trailers"), (b"X-Ok", b"1")]
    assert request_headers(given) == [(b"Host", b"h"), (b"X-Ok", b"1")]


def test_connect_timeout_is_its_own_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    async def black_hole(*args: object, **kwargs: object) -> None:
        await asyncio.sleep(60)  # a SYN nobody answers: the socket never connects

    monkeypatch.setattr(asyncio.selector_events.BaseSelectorEventLoop, "sock_connect", black_hole)

    async def go() -> None:
        client = UpstreamClient()
        with pytest.raises(NoResponse) as caught:
            await asyncio.wait_for(
                client.send(parse_upstream_url("http://192.0.2.1:8083"), "GET", "/", HEADERS, 0.05), 5
            )
        assert caught.value.failure is Failure.CONNECT_TIMEOUT

    run(go())


def test_a_worker_connected_while_the_router_was_busy_is_used() -> None:
    # In a reconnect storm the router's loop runs in turns of seconds: the worker accepted at
    # once, so the late look at the connect must not fail the request over (connect.py).
    async def go() -> None:
        server = Server(answer(OK))
        url = await server.start()
        client = UpstreamClient()
        task = asyncio.create_task(client.send(parse_upstream_url(url), "GET", "/", HEADERS, 0.05))
        await asyncio.sleep(0)  # the connect is under way
        time.sleep(0.3)  # the router's loop is stuck for six times the connect timeout
        response = await task
        assert response.status_code == 200
        assert server.connections == 1
        await server.stop()

    run(go())


def test_keep_only_drops_connections_to_workers_no_longer_configured() -> None:
    async def go() -> None:
        kept, dropped = Server(answer(OK)), Server(answer(OK))
        kept_url, dropped_url = await kept.start(), await dropped.start()
        client = UpstreamClient()
        await send(client, kept_url)
        await send(client, dropped_url)
        assert (client.idle_connections(kept_url), client.idle_connections(dropped_url)) == (1, 1)
        client.keep_only({kept_url})  # a reload removed the second worker
        assert (client.idle_connections(kept_url), client.idle_connections(dropped_url)) == (1, 0)
        await send(client, dropped_url)  # a request decided before the reload still completes...
        assert client.idle_connections(dropped_url) == 0  # ...but its connection is not kept
        assert dropped.connections == 2
        client.close()
        await kept.stop()
        await dropped.stop()

    run(go())


@pytest.mark.parametrize(
    "header",
    [
        (b"Authorization", b"Bearer tok\r\n\r\nGET /_smuggled HTTP/1.1\r\nHost: x"),
        (b"Authorization", b"Bearer tok\nX-A: b"),
        (b"X-A", b"b\x00"),
        (b"X A", b"b"),
    ],
)
def test_a_header_that_could_smuggle_is_refused_before_anything_is_sent(header: tuple[bytes, bytes]) -> None:
    async def go() -> None:
        server = Server(answer(OK))
        url = await server.start()
        client = UpstreamClient()
        with pytest.raises(BadRequest):
            await send(client, url, headers=[(b"Host", b"matrix.example"), header])
        assert server.connections == 0 and server.requests == []
        await server.stop()

    run(go())


def test_a_target_with_control_bytes_is_refused() -> None:
    async def go() -> None:
        client = UpstreamClient()
        upstream = parse_upstream_url("http://127.0.0.1:9")
        for path in ("/sync\r\nX: y", "/sync HTTP/1.1\r\n\r\nGET /x", "/\x00"):
            with pytest.raises(BadRequest):
                await client.send(upstream, "GET", path, HEADERS, 1.0)

    run(go())


def test_a_worker_answering_more_than_asked_never_reaches_the_next_request() -> None:
    # Two responses to one request: the second must not become the answer to someone else's.
    extra = b'HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n{"x":"y"}'

    async def go() -> None:
        replies = [OK + extra, b'HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\n{"n":2}']

        async def script(head: bytes) -> bytes:
            return replies.pop(0) if replies else OK

        server = Server(script)
        url = await server.start()
        client = UpstreamClient()
        first = await send(client, url)
        assert first.raw_content == b"{}"
        second = await send(client, url)
        assert second.raw_content == b'{"n":2}'  # on a fresh connection, not the leftover answer
        assert server.connections == 2
        await server.stop()

    run(go())


def test_bytes_arriving_on_an_idle_connection_retire_it() -> None:
    async def go() -> None:
        async def script(head: bytes) -> bytes:
            return OK

        server = Server(script)
        url = await server.start()
        client = UpstreamClient()
        await send(client, url)
        assert client.idle_connections(url) == 1
        connection = client._idle[url][0]
        connection.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")  # unsolicited
        await send(client, url)
        assert server.connections == 2
        await server.stop()

    run(go())


def test_abandon_closes_the_owners_connection_without_a_retry() -> None:
    async def go() -> None:
        hold = asyncio.Event()

        async def script(head: bytes) -> bytes | None:
            await hold.wait()  # a long-poll
            return OK

        server = Server(script)
        url = await server.start()
        client = UpstreamClient()
        upstream = parse_upstream_url(url)
        waiting = asyncio.ensure_future(
            client.send(upstream, "GET", "/_matrix/client/v3/sync?timeout=30000", HEADERS, 1.0, owner="flow-1")
        )
        while not server.requests:
            await asyncio.sleep(0.01)
        assert not client.abandon("flow-2")  # not in flight
        assert client.abandon("flow-1")
        with pytest.raises(NoResponse):
            await asyncio.wait_for(waiting, 5)
        assert len(server.requests) == 1 and client.busy_connections(url) == 0
        hold.set()
        await server.stop()

    run(go())


def test_abort_without_cut_leaves_requests_on_a_busy_worker_to_finish() -> None:
    # Marked down for slow health checks while it still answers: nothing in flight is cut, and
    # its connections are not kept for later requests.
    async def go() -> None:
        hold = asyncio.Event()

        async def script(head: bytes) -> bytes | None:
            await hold.wait()
            return OK

        server = Server(script)
        url = await server.start()
        client = UpstreamClient()
        waiting = [asyncio.ensure_future(send(client, url)) for _ in range(2)]
        while len(server.requests) < 2:
            await asyncio.sleep(0.01)
        assert client.abort(url, cut_busy=False) == 0
        hold.set()
        for task in waiting:
            assert (await asyncio.wait_for(task, 5)).status_code == 200
        assert client.idle_connections(url) == 0
        await server.stop()

    run(go())


def test_silent_for_counts_from_the_workers_last_byte() -> None:
    async def go() -> None:
        server = Server(answer(OK))
        url = await server.start()
        client = UpstreamClient()
        assert client.silent_for(url) == float("inf")
        await send(client, url)
        assert 0 <= client.silent_for(url) < 5
        await asyncio.sleep(0.2)
        assert client.silent_for(url) >= 0.2
        await server.stop()

    run(go())


def test_a_reused_connection_failing_then_a_refused_reconnect_is_no_response() -> None:
    # The request went out on the kept-alive connection before the worker died: it may have
    # been acted on, so it is a request without a response (resent only if safe, counted as a
    # retry), and the worker is known to refuse connections.
    async def go() -> None:
        answers = iter([OK])

        async def script(head: bytes) -> bytes | None:
            return next(answers, None)  # the second request: closed unanswered, as by a crash

        server = Server(script)
        url = await server.start()
        client = UpstreamClient()
        await send(client, url)
        assert client.idle_connections(url) == 1
        assert server.server is not None
        server.server.close()  # no longer listening: reconnecting is refused
        with pytest.raises(NoResponse) as caught:
            await asyncio.wait_for(send(client, url), 5)
        assert caught.value.failure is Failure.NO_RESPONSE
        assert caught.value.refused
        assert "then connecting again" in str(caught.value)
        assert len(server.requests) == 2

    run(go())
