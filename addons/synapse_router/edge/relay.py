"""A loopback relay that lets mitmproxy stream a worker's answer the router read the head of.

mitmproxy streams only answers it reads from a server itself (`flow.response.stream` in
`responseheaders`); an answer an addon sets in the `request` hook is sent whole. So when a
request the router sent itself gets an answer too long to hold (upstream_client.py: longer
than `limits.response_buffer`, or the budget is spent), the router points the flow at this
relay and lets mitmproxy forward it here: the relay answers with the worker's head and body as
they arrive, and mitmproxy streams them to the client as it streams any worker's answer.

Framing is h11's both ways: the relay reads (and drops) the request mitmproxy forwards with an
h11 server connection and writes the answer with it (the worker's Content-Length kept, else
chunked). Which answer a request gets is named by a ticket in the `X-Synapse-Router-Relay`
header, random and used once (`hand`), so no other local process can take an answer. The
relay keeps memory bounded: it reads the worker only while its own transport is below its
write buffer limit (mitmproxy in turn reads the relay only while the client keeps up), and a
ticket nobody claims within TICKET_TTL seconds (the flow died before mitmproxy connected) is
dropped with its worker connection. When mitmproxy closes a relay connection (its client
left) the worker's connection is closed at once. No mitmproxy import: any HTTP/1.1 client can
be the other side.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from typing import Protocol, cast

import h11

log = logging.getLogger(__name__)

HEADER = "X-Synapse-Router-Relay"
TICKET_TTL = 60.0  # seconds a handed answer waits for mitmproxy's request
MAX_REQUEST_HEAD = 64 * 1024


class Answer(Protocol):
    """What the relay sends: upstream_client.StreamedAnswer."""

    head: h11.Response

    async def next_chunk(self) -> bytes | None: ...

    def close(self) -> None: ...


class Relay:
    def __init__(self, host: str = "127.0.0.1") -> None:
        self.host = host
        self.port: int | None = None
        self._server: asyncio.Server | None = None
        self._starting: asyncio.Lock | None = None
        self._tickets: dict[bytes, tuple[Answer, asyncio.TimerHandle]] = {}
        self._connections: set[_RelayConnection] = set()

    async def start(self) -> int:
        """Listen (once) on a free loopback port; returns it."""
        if self._starting is None:
            self._starting = asyncio.Lock()
        async with self._starting:
            if self._server is None or self.port is None:
                loop = asyncio.get_running_loop()
                self._server = await loop.create_server(lambda: _RelayConnection(self), self.host, 0)
                self.port = int(self._server.sockets[0].getsockname()[1])
            return self.port

    def hand(self, answer: Answer) -> str:
        """Keep `answer` for the request that brings the returned ticket."""
        ticket = secrets.token_hex(16)
        expiry = asyncio.get_running_loop().call_later(TICKET_TTL, self._expire, ticket.encode())
        self._tickets[ticket.encode()] = (answer, expiry)
        return ticket

    def claim(self, ticket: bytes) -> Answer | None:
        found = self._tickets.pop(ticket, None)
        if found is None:
            return None
        answer, expiry = found
        expiry.cancel()
        return answer

    def pending(self) -> int:
        return len(self._tickets)

    def _expire(self, ticket: bytes) -> None:
        answer = self.claim(ticket)
        if answer is not None:
            answer.close()

    def close(self) -> None:
        for ticket in list(self._tickets):
            self._expire(ticket)
        for connection in list(self._connections):
            connection.abort()
        if self._server is not None:
            self._server.close()
            self._server = None
            self.port = None


class _RelayConnection(asyncio.Protocol):
    """One connection from mitmproxy: requests read by h11, each answered from its ticket."""

    def __init__(self, relay: Relay) -> None:
        self._relay = relay
        self._h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_HEAD)
        self._transport: asyncio.Transport | None = None
        self._ticket: bytes | None = None
        self._task: asyncio.Task[None] | None = None
        self._answering = False  # a request is being answered (its task may have run eagerly)
        self._answer: Answer | None = None
        self._writable: asyncio.Future[None] | None = None
        self._paused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport; not an isinstance check: uvloop's transports are no subclass of asyncio's ABCs.
        self._transport = cast(asyncio.Transport, transport)
        self._relay._connections.add(self)

    def data_received(self, data: bytes) -> None:
        self._h11.receive_data(data)
        self._next_events()

    def eof_received(self) -> bool | None:
        self._h11.receive_data(b"")
        self._next_events()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._relay._connections.discard(self)
        if self._task is not None and not self._task.done():
            self._task.cancel()
        self._drop_answer()
        self._wake_writer()

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        self._wake_writer()

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    def _wake_writer(self) -> None:
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)

    def _drop_answer(self) -> None:
        if self._answer is not None:
            answer, self._answer = self._answer, None
            answer.close()

    def _next_events(self) -> None:
        """Read the request: its ticket from the head, its body dropped; at its end, answer."""
        if self._answering:
            return  # answering: the next request (if any) is read once this one is done
        try:
            while True:
                event = self._h11.next_event()
                if isinstance(event, h11.Request):
                    self._ticket = dict(event.headers).get(HEADER.lower().encode())
                elif isinstance(event, h11.EndOfMessage):
                    # mitmproxy runs its loop with asyncio's eager task factory: the task may
                    # run (even to its end) before create_task returns.
                    self._answering = True
                    task = asyncio.get_running_loop().create_task(self._answer_request())
                    if not task.done():
                        self._task = task
                    return
                elif event is h11.NEED_DATA or event is h11.PAUSED:
                    return
                elif isinstance(event, h11.ConnectionClosed):
                    self.abort()
                    return
        except h11.ProtocolError:
            self.abort()

    async def _answer_request(self) -> None:
        transport = self._transport
        assert transport is not None
        ticket, self._ticket = self._ticket, None
        answer = self._relay.claim(ticket) if ticket is not None else None
        if answer is None:  # not a request the router handed here
            body = b'{"errcode":"M_UNKNOWN","error":"The server gave no response."}'
            head = h11.Response(
                status_code=502,
                headers=[(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
            )
            transport.write(self._h11.send(head) + self._h11.send(h11.Data(data=body)))
            transport.write(self._h11.send(h11.EndOfMessage()))
            transport.close()
            self._answering = False
            return
        self._answer = answer
        try:
            transport.write(self._h11.send(answer.head))
            while (chunk := await answer.next_chunk()) is not None:
                transport.write(self._h11.send(h11.Data(data=chunk)))
                while self._paused and not transport.is_closing():
                    self._writable = asyncio.get_running_loop().create_future()
                    await self._writable
                if transport.is_closing():
                    return
            transport.write(self._h11.send(h11.EndOfMessage()))
        except asyncio.CancelledError:
            raise
        except Exception as e:  # the worker failed mid-answer (NoResponse), or h11 refused it
            # A cut connection is what mitmproxy relays as a cut answer (the client's
            # connection closes); the worker's connection is closed by `close`.
            log.debug(f"synapse-router: relayed answer cut: {type(e).__name__}: {e}")
            self._drop_answer()
            transport.abort()
            return
        finally:
            self._task = None
            self._answering = False
        self._answer = None
        if self._h11.our_state is h11.DONE and self._h11.their_state is h11.DONE:
            with contextlib.suppress(h11.ProtocolError):
                self._h11.start_next_cycle()
                self._next_events()
                return
        transport.close()
