"""The router's own upstream requests, for requests it can retry on another worker.

mitmproxy answers a client 502 as soon as an upstream connection closes before the response,
and offers no hook to retry. For idempotent requests (sync long-polls above all) the addon
sends the request itself: if the worker refuses the connection, times out connecting, or
fails before its whole response arrived, the request goes to the next worker. Bytes pass
untouched both ways: no Accept-Encoding is added, nothing is decoded.

Framing is h11's (the HTTP/1.1 library mitmproxy itself depends on), not ours: h11 writes the
request head and parses the response's status line and header fields, decides its framing
(Content-Length, chunked, close-delimited; none for HEAD, 204, 304) and reads its body. The
pieces are the ones mitmproxy's own HTTP/1 layer uses (h11's receive buffer and body readers,
private h11 names kept in compat/h11parts.py; mitmproxy pins h11's exact version), without h11's
connection state machine: one request per exchange and nothing pipelined needs no state machine,
and it cost more than half the client's instructions per exchange (docs/benchmarks.md). Every
header the router writes is validated once, by `wellformed.fields_writable` (h11's own field
rules and no control byte: no CR, LF or NUL can reach a worker, so a client cannot smuggle a
second request onto a connection that other users' requests share); h11 then checks the method,
the target, Host, Content-Length and Transfer-Encoding. A connection goes back to the pool only
after a complete, well-framed exchange that leaves the connection open (no `Connection: close`,
not HTTP/1.0, not close-delimited) with nothing unread, and is checked again before reuse: a
worker that sent bytes nobody asked for is closed.

Connections are kept alive per worker (an `asyncio.Protocol` per connection feeding h11, no
stream layer in between); httpx on this path cost 1.1-2.4 ms of CPU per request, several
times what mitmproxy spends on a whole proxied request (docs/benchmarks.md).

Memory per exchange is bounded whatever the answer's size: the worker's connection stops
being read while more than READ_HIGH bytes wait in its receive buffer; an answer body is held
whole only up to `response_buffer` bytes and while the process-wide `BufferBudget` allows it.
A longer answer is returned as a `StreamedAnswer` (its checked head, the body so far, and the
rest read on demand: relay.py passes it to mitmproxy, which streams it to the client). Until
then nothing of the answer has left the router, so the request can still be resent. Every
wait for the worker's next bytes is bounded by a read timeout (nginx's proxy_read_timeout).
"""

from __future__ import annotations

import asyncio
import math
import ssl
import time
from collections.abc import Callable, Iterable
from functools import partial
from typing import cast

import h11
from mitmproxy import http
from mitmproxy.net.http import http1, validate

from ..compat.h11parts import ChunkedReader, ContentLengthReader, Http10Reader, ReceiveBuffer, request_head
from ..routing.exchange import FailureKind
from ..routing.retry import SAFE_METHODS
from ..routing.upstream import Upstream
from .connect import open_socket
from .wellformed import fields_writable, head_relayable

HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)
MAX_HEAD = 64 * 1024  # bytes of status line and headers; more is not an HTTP response we relay
READ_HIGH = 64 * 1024  # unread bytes of a worker connection beyond which it is not read
MAX_IDLE_PER_WORKER = 256


# What a response's framing depends on in the request: only whether it answers a HEAD.
_HEAD = http.Request.make("HEAD", "http://upstream/")
_NOT_HEAD = http.Request.make("GET", "http://upstream/")


# How an exchange failed: one enum for the whole router (routing/exchange.py), of which this
# client raises CONNECT_ERROR, CONNECT_TIMEOUT, NO_RESPONSE and READ_TIMEOUT.
Failure = FailureKind


class NoResponse(Exception):
    """The worker gave no (complete) response; `failure` says at which step, `refused` whether
    a connection to it was refused on the way (it is not listening)."""

    def __init__(self, failure: Failure, detail: str, refused: bool = False) -> None:
        super().__init__(detail)
        self.failure = failure
        self.refused = refused or failure is Failure.CONNECT_ERROR


class BufferBudget:
    """Bytes of answer bodies held by all exchanges of a process, and their limit: an exchange
    takes bytes before holding them and gives them back once they are sent on or dropped."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0
        self.refused = 0  # answers streamed from their head on because the budget was spent

    def take(self, size: int) -> bool:
        if self.held + size > self.limit:
            return False
        self.held += size
        return True

    def give(self, size: int) -> None:
        self.held = max(0, self.held - size)


class BadRequest(ValueError):
    """The request is not valid HTTP/1.1 as given (a header value with a CR, say): nothing was
    sent, and nothing should be."""


def request_headers(headers: Iterable[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    return [(k, v) for k, v in headers if k.lower() not in HOP_BY_HOP]


class _Connection(asyncio.Protocol):
    """One keep-alive connection to a worker: bytes in go straight into its receive buffer."""

    def __init__(self, url: str, heard: dict[str, float]) -> None:
        self._url = url
        self._heard = heard  # the client's: per worker, when it last sent any byte
        self.buffer = ReceiveBuffer()
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.keep_alive = True  # False once a response said the connection ends with it
        self.received = 0  # bytes of the current exchange
        self.abandoned = False  # closed because the client of its exchange left
        self.resendable = True  # its exchange may be cut when the worker is found dead (it is resent)
        self.cut = False  # closed by the router because its worker was found dead
        self.paused = False  # not read: READ_HIGH bytes wait in the buffer
        self._wakeup: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport; not an isinstance check: uvloop's transports are no subclass of asyncio's ABCs.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self._heard[self._url] = time.monotonic()
        self.received += len(data)
        self.buffer += data
        if len(self.buffer) > READ_HIGH and not self.paused and self.transport is not None:
            self.paused = True  # until its reader wants more (wait_for_data): bounded memory
            self.transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool | None:
        self._end()
        return None  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self._end()

    def _end(self) -> None:
        self.closed = True
        self._wake()

    def _wake(self) -> None:
        if self._wakeup is not None and not self._wakeup.done():
            self._wakeup.set_result(None)

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()
        self._end()

    def reusable(self) -> bool:
        """Open, kept alive by its last response, and nothing received since that ended."""
        return (
            not self.closed
            and self.keep_alive
            and self.transport is not None
            and not self.transport.is_closing()
            and not self.buffer
        )

    async def wait_for_data(self, timeout: float | None) -> None:
        """Until more bytes (or the end) arrived; raises if the end already did, TimeoutError
        if nothing arrived within `timeout` seconds (None: no limit)."""
        if self.closed:
            raise h11.RemoteProtocolError("connection closed mid-message")
        if self.paused and self.transport is not None:
            self.paused = False
            self.transport.resume_reading()
        loop = asyncio.get_running_loop()
        wakeup = self._wakeup = loop.create_future()
        timer = None if timeout is None else loop.call_later(timeout, _expire, wakeup, timeout)
        try:
            await wakeup
        finally:
            if timer is not None:
                timer.cancel()


def _expire(wakeup: asyncio.Future[None], timeout: float) -> None:
    if not wakeup.done():
        wakeup.set_exception(TimeoutError(f"the worker sent nothing for {timeout:g}s"))


class UpstreamClient:
    """Keep-alive HTTP/1.1 connections to workers, and the requests sent on them."""

    def __init__(self) -> None:
        self._idle: dict[str, list[_Connection]] = {}
        self._busy: dict[str, set[_Connection]] = {}
        self._owned: dict[object, _Connection] = {}  # exchange owner (a flow id) -> its connection
        self._aborts: dict[str, int] = {}  # per worker, how many times `abort` was called
        self._heard: dict[str, float] = {}  # per worker, when it last sent a byte (monotonic)
        self._pooled: frozenset[str] | None = None  # workers whose connections are kept; None: all
        self.main_url: str | None = None  # the main process: its connections are always kept
        self._tls: ssl.SSLContext | None = None
        self.response_buffer = 256 * 1024  # answer body bytes one exchange holds (limits.response_buffer)
        self.budget = BufferBudget(64 * 1024 * 1024)  # what all exchanges hold (limits.buffer_budget)

    def set_buffers(self, response_buffer: int, budget: int) -> None:
        """New limits (a reload): bytes held now stay counted against the new budget."""
        self.response_buffer = response_buffer
        self.budget.limit = budget

    async def send(
        self,
        upstream: Upstream,
        method: str,
        path: str,
        headers: list[tuple[bytes, bytes]],
        connect_timeout: float,
        body: bytes = b"",
        owner: object = None,
        resendable: bool = True,
        read_timeout: float | None = None,
        head_timeout: float | None = None,
    ) -> http.Response | StreamedAnswer:
        """Send a request to a worker and read its response: whole if its body fits the
        response buffer (and the budget), else its head and the body so far, as a StreamedAnswer
        whose rest is read on demand. Raises BadRequest (before anything is sent) if the request
        is not valid HTTP/1.1, NoResponse if the worker gives no (complete) response (also when
        `abort` or `abandon(owner)` closed the connection, and after `head_timeout` seconds
        without the head's next bytes, `read_timeout` for the body's: Failure.READ_TIMEOUT).
        A reused connection that fails is replaced by a fresh one only if `resendable`: the
        worker may have read the request before it failed."""
        timeouts = (head_timeout if head_timeout is not None else read_timeout, read_timeout)
        url = upstream.url
        request = _request_bytes(upstream, method, path, headers, body)
        aborts = self._aborts.get(url, 0)
        connection = self._checkout(url)
        reused_failed: NoResponse | None = None
        if connection is not None:
            try:
                return await self._exchange(url, connection, request, method, aborts, owner, resendable, timeouts)
            except NoResponse as e:
                if (
                    not resendable
                    or e.failure is Failure.READ_TIMEOUT
                    or self._aborts.get(url, 0) != aborts
                    or (connection.abandoned and owner is not None)
                ):
                    raise
                # The worker may have closed an idle connection as we reused it: once more, fresh.
                reused_failed = e
        try:
            connection = await self._connect(upstream, connect_timeout)
        except NoResponse as e:
            if reused_failed is None:
                raise
            # The request went out on the reused connection: the worker may have acted on it,
            # so this is a request without a response (resent only if safe), not a connect error.
            detail = f"{reused_failed}; then connecting again: {e}"
            raise NoResponse(Failure.NO_RESPONSE, detail, refused=e.refused) from e
        return await self._exchange(url, connection, request, method, aborts, owner, resendable, timeouts)

    def abandon(self, owner: object) -> bool:
        """The client of `owner`'s exchange has left: close its connection (the exchange raises
        NoResponse). False if it has none in flight."""
        connection = self._owned.pop(owner, None)
        if connection is None:
            return False
        connection.abandoned = True
        connection.abort()
        return True

    def abort(self, url: str, cut_busy: bool = True) -> int:
        """A worker is down: close its idle connections, keep none of those in use, and (with
        `cut_busy`, for a worker found dead) close those whose requests will be resent, so they
        give up at once (each raises NoResponse); returns how many were cut."""
        self._aborts[url] = self._aborts.get(url, 0) + 1
        for connection in self._idle.pop(url, []):
            connection.abort()
        if not cut_busy:
            return 0
        # A request that will not be resent is left to finish: the worker may only be slow,
        # and cutting it would turn a late answer into an error (its wait is bounded by the
        # read timeout). It stays in the bookkeeping, so `close` still reaches it; its
        # connection is not kept (the abort count changed).
        busy = self._busy.get(url, set())
        cut = [connection for connection in busy if connection.resendable]
        for connection in cut:
            busy.discard(connection)
            connection.cut = True
            connection.abort()
        return len(cut)

    def keep_only(self, urls: Iterable[str]) -> None:
        """Pool connections only to these workers (the configured ones) from now on: idle
        connections to others are closed, and requests in flight to them keep none."""
        self._pooled = frozenset(urls)
        for url in set(self._idle) - self._pooled - {self.main_url}:
            for connection in self._idle.pop(url):
                connection.abort()

    def close(self) -> None:
        for url in set(self._idle) | set(self._busy):
            for connection in self._busy.get(url, ()):
                connection.resendable = True  # shutting down: nothing is left to finish
            self.abort(url)

    def silent_for(self, url: str) -> float:
        """Seconds since the worker last sent a byte on any of the router's connections to it
        (infinite if never): a busy worker keeps answering something, a wedged one nothing."""
        heard = self._heard.get(url)
        return math.inf if heard is None else time.monotonic() - heard

    def idle_connections(self, url: str) -> int:
        return len(self._idle.get(url, ()))

    def busy_connections(self, url: str) -> int:
        return len(self._busy.get(url, ()))

    def _checkout(self, url: str) -> _Connection | None:
        idle = self._idle.get(url)
        while idle:
            connection = idle.pop()
            if connection.reusable():
                return connection
            connection.abort()
        return None

    async def _connect(self, upstream: Upstream, timeout: float) -> _Connection:
        tls = self._tls_context() if upstream.scheme == "https" else None
        loop = asyncio.get_running_loop()
        try:
            sock = await open_socket(upstream.host, upstream.port, timeout)
        except TimeoutError:
            raise NoResponse(Failure.CONNECT_TIMEOUT, f"no connection within {timeout:g}s") from None
        except OSError as e:
            raise NoResponse(Failure.CONNECT_ERROR, e.strerror or str(e) or type(e).__name__) from e
        try:
            _, connection = await loop.create_connection(
                partial(_Connection, upstream.url, self._heard),
                sock=sock,
                ssl=tls,
                server_hostname=upstream.host if tls is not None else None,
                ssl_handshake_timeout=timeout if tls is not None else None,
            )
        except (OSError, ssl.SSLError) as e:  # TimeoutError included: a TLS handshake not done in time
            sock.close()
            raise NoResponse(Failure.CONNECT_ERROR, e.strerror or str(e) or type(e).__name__) from e
        except BaseException:
            sock.close()
            raise
        return connection

    async def _exchange(
        self,
        url: str,
        connection: _Connection,
        request: bytes,
        method: str,
        aborts: int,
        owner: object,
        resendable: bool,
        timeouts: tuple[float | None, float | None],
    ) -> http.Response | StreamedAnswer:
        """Send the request on the connection and read the response, unless the worker was
        found dead since the request began (`aborts` changed)."""
        if self._aborts.get(url, 0) != aborts:
            connection.abort()
            raise NoResponse(Failure.CONNECT_ERROR, "worker found dead while connecting")  # nothing sent
        connection.resendable = resendable
        busy = self._busy.setdefault(url, set())
        busy.add(connection)
        if owner is not None:
            self._owned[owner] = connection
        release = partial(self._release, url, connection, aborts, owner)
        try:
            assert connection.transport is not None
            connection.received = 0
            connection.transport.write(request)
            response = await _read_response(connection, method, timeouts, self.response_buffer, self.budget)
        except TimeoutError as e:  # before OSError, of which it is one
            connection.abort()
            release()
            raise NoResponse(Failure.READ_TIMEOUT, str(e)) from e
        except (ValueError, h11.ProtocolError, OSError) as e:  # ValueError: mitmproxy's parser
            detail = _describe(e, connection)  # before abort: it tells whether the worker closed first
            connection.abort()
            release()
            raise NoResponse(Failure.NO_RESPONSE, detail) from e
        except BaseException:  # cancelled (the client left): the connection is mid-exchange, useless
            connection.abort()
            release()
            raise
        if isinstance(response, _Partial):  # still busy: the rest is read as it is relayed
            return StreamedAnswer(response, connection, timeouts[1], self.budget, release)
        release()
        return response

    def _release(self, url: str, connection: _Connection, aborts: int, owner: object) -> None:
        """The exchange is over (complete, failed or given up): out of the bookkeeping, and
        back to the pool only if the connection can carry another exchange."""
        busy = self._busy.get(url)
        if busy is not None:
            busy.discard(connection)
        if owner is not None and self._owned.get(owner) is connection:
            del self._owned[owner]
        if connection.closed:
            return
        reusable = connection.reusable()
        pooled = self._pooled is None or url in self._pooled or url == self.main_url
        if reusable and self._aborts.get(url, 0) == aborts and pooled:
            idle = self._idle.setdefault(url, [])
            if len(idle) < MAX_IDLE_PER_WORKER:
                idle.append(connection)
                return
        connection.abort()

    def _tls_context(self) -> ssl.SSLContext:
        if self._tls is None:
            self._tls = ssl.create_default_context()
        return self._tls


def _request_bytes(
    upstream: Upstream, method: str, path: str, headers: list[tuple[bytes, bytes]], body: bytes
) -> bytes:
    """The request as written on the wire. The fields are validated here (fields_writable), the
    method, target, Host and Content-Length by h11."""
    fields = [(k, v) for k, v in headers if k.lower() != b"content-length"]
    if not any(k.lower() == b"host" for k, _ in fields):
        default_port = 443 if upstream.scheme == "https" else 80
        host = upstream.url.partition("://")[2] if upstream.port != default_port else upstream.host
        fields.append((b"Host", host.encode()))
    if body or method not in SAFE_METHODS:
        fields.append((b"Content-Length", str(len(body)).encode()))
    if not fields_writable(fields):
        raise BadRequest("invalid header field")
    try:
        # h11 skips its per-field regexes (fields_writable applied the same rules and more)
        # and keeps every other check.
        head = request_head(method.encode("ascii"), path.encode("ascii"), fields)
    except (h11.LocalProtocolError, UnicodeEncodeError) as e:
        raise BadRequest(str(e)) from None
    return head + body  # the body framed by its Content-Length


class _Partial:
    """An answer whose body did not fit the buffer: its head (hop-by-hop fields out, as
    relayed), the h11 head that writes it, the body held so far (`held` bytes of which are
    taken from the budget) and the reader of the rest."""

    __slots__ = ("response", "head", "chunks", "held", "reader")

    def __init__(
        self,
        response: http.Response,
        head: h11.Response,
        chunks: list[bytes],
        held: int,
        reader: ChunkedReader | ContentLengthReader | Http10Reader,
    ) -> None:
        self.response = response
        self.head = head
        self.chunks = chunks
        self.held = held
        self.reader = reader


class StreamedAnswer:
    """A worker's answer too long to hold: its head, checked, and its body read on demand by
    `next_chunk` (the connection is read only while the consumer asks, so at most READ_HIGH
    bytes and one read wait in it). Once anything of it was sent on, it is never resent. The
    exchange stays busy (and `abandon`/`abort`/`close` reach it) until the body ended or
    `close` gave it up."""

    def __init__(
        self,
        partial_: _Partial,
        connection: _Connection,
        read_timeout: float | None,
        budget: BufferBudget,
        release: Callable[[], None],
    ) -> None:
        self.response = partial_.response
        self.head = partial_.head
        self._chunks = partial_.chunks
        self._held = partial_.held
        self._reader = partial_.reader
        self._connection = connection
        self._read_timeout = read_timeout
        self._budget = budget
        self._release: Callable[[], None] | None = release
        connection.resendable = False  # a worker found dead no longer cuts it for a resend

    async def next_chunk(self) -> bytes | None:
        """The body's next bytes, None at its end. Raises NoResponse when the worker fails
        (closes early, sends a malformed body, sends nothing for the read timeout)."""
        if self._chunks:
            chunk = self._chunks.pop(0)
            if self._held:  # sent on now: out of the budget
                given = min(self._held, len(chunk))
                self._budget.give(given)
                self._held -= given
            return chunk
        connection = self._connection
        try:
            while True:
                part = self._reader(connection.buffer)
                if part is None:
                    if not connection.closed:
                        await connection.wait_for_data(self._read_timeout)
                        continue
                    part = self._reader.read_eof()
                if type(part) is h11.Data:
                    if part.data:
                        return bytes(part.data)
                    continue
                break
        except TimeoutError as e:
            self.close()
            raise NoResponse(Failure.READ_TIMEOUT, str(e)) from e
        except (ValueError, h11.ProtocolError, OSError) as e:
            detail = _describe(e, connection)
            self.close()
            raise NoResponse(Failure.NO_RESPONSE, detail) from e
        closes = http1.connection_close(self.response.data.http_version, self.response.headers)  # type: ignore[no-untyped-call]
        connection.keep_alive = not isinstance(self._reader, Http10Reader) and not closes
        self._finish()
        return None

    def close(self) -> None:
        """Give up the rest (the client left, or the body failed): the connection is closed."""
        if self._release is not None:
            self._connection.abort()
        self._finish()

    def _finish(self) -> None:
        self._budget.give(self._held)
        self._held = 0
        self._chunks.clear()
        if self._release is not None:
            release, self._release = self._release, None
            release()


async def _read_response(
    connection: _Connection,
    method: str,
    timeouts: tuple[float | None, float | None],
    limit: int,
    budget: BufferBudget,
) -> http.Response | _Partial:
    """One final response (informational ones skipped), its body read whole if it is at most
    `limit` bytes and the budget allows holding it, else the head and what was read (a
    _Partial). The head is read, validated and framed as mitmproxy reads a worker's response
    on its own path (its `http1` functions, `validate_headers` as with
    `validate_inbound_headers`), the body by h11's readers. `timeouts`: the longest waits for
    the head's and for the body's next bytes."""
    head_timeout, read_timeout = timeouts
    buffer = connection.buffer
    while True:
        size = len(buffer)
        lines = buffer.maybe_extract_lines()
        if lines is None:
            if size > MAX_HEAD:
                raise MalformedAnswer(f"response head over {MAX_HEAD} bytes")
            await connection.wait_for_data(head_timeout)
            continue
        if size - len(buffer) > MAX_HEAD:
            raise MalformedAnswer(f"response head over {MAX_HEAD} bytes")
        if not lines:
            raise MalformedAnswer("no status line")
        response = http1.read_response_head([bytes(line) for line in lines])
        if not 100 <= response.status_code <= 599:  # mitmproxy's parser takes any integer
            raise MalformedAnswer("a status code outside 100-599")
        if response.status_code >= 200:
            break
        if response.status_code == 101:  # nobody asked to switch protocols (Upgrade is not relayed)
            raise MalformedAnswer("unexpected 101 Switching Protocols")
    validate.validate_headers(response)
    fields = response.headers.fields
    # mitmproxy's parser keeps a bare CR or a NUL in a value; relayed, a client could read a
    # line break there (response splitting). Only what a client may safely read goes back.
    if not head_relayable(response.data.reason, fields):
        raise MalformedAnswer("a control byte in the response head")
    transfer_encoding = response.headers.get("transfer-encoding")
    if transfer_encoding is not None and validate.parse_transfer_encoding(transfer_encoding) != "chunked":
        raise MalformedAnswer("a transfer-encoding other than chunked: the body would be relayed still encoded")
    expected = http1.expected_http_body_size(_HEAD if method == "HEAD" else _NOT_HEAD, response)
    reader = (
        ChunkedReader() if expected is None else Http10Reader() if expected == -1 else ContentLengthReader(expected)
    )
    relayed = tuple((k, v) for k, v in fields if k.lower() not in HOP_BY_HOP)
    chunks: list[bytes] = []
    held = 0
    handed_on = False  # a _Partial returned: its held bytes stay taken until relayed
    try:
        while True:
            part = reader(buffer)
            if part is None:
                if not connection.closed:
                    await connection.wait_for_data(read_timeout)
                    continue
                part = reader.read_eof()  # the end of a close-delimited body; raises for any other
            if type(part) is not h11.Data:
                break
            size = len(part.data)
            if held + size > limit or not budget.take(size):
                if held + size <= limit:
                    budget.refused += 1
                chunks.append(bytes(part.data))  # at most one read beyond the buffer
                head = _h11_head(response, relayed)
                if relayed != fields:
                    response.headers.fields = relayed
                handed_on = True
                return _Partial(response, head, chunks, held, reader)
            held += size
            chunks.append(part.data)
    finally:
        if not handed_on:  # whole now (the flow holds it), or failed
            budget.give(held)
    closes = http1.connection_close(response.data.http_version, response.headers)  # type: ignore[no-untyped-call]
    connection.keep_alive = expected != -1 and not closes
    body = b"".join(chunks)
    # The body is relayed whole: its length frames it (a HEAD, 204 or 304 answer has none to give).
    if expected != 0 and not any(k.lower() == b"content-length" for k, _ in relayed):
        relayed += ((b"content-length", str(len(body)).encode()),)
    if relayed != fields:
        response.headers.fields = relayed
    response.data.http_version = b"HTTP/1.1"  # as it is relayed, framed by its length
    response.raw_content = body
    return response


class MalformedAnswer(ValueError):
    """A worker's answer the router will not relay, said in the router's own fixed words."""


def _h11_head(response: http.Response, fields: tuple[tuple[bytes, bytes], ...]) -> h11.Response:
    """The head as h11 writes it on to the client (relay.py); h11's field rules are checked
    now, before anything of the answer is committed (ValueError: a malformed response)."""
    try:
        return h11.Response(status_code=response.status_code, headers=list(fields), reason=response.data.reason)
    except h11.LocalProtocolError:
        raise MalformedAnswer("a response head h11 would not write") from None


def _describe(error: BaseException, connection: _Connection) -> str:
    if connection.cut:
        return "cut by the router: the health checks found the worker dead while it waited"
    # The readers raise LocalProtocolError for what they cannot parse, RemoteProtocolError for
    # a connection that ended early (h11's connection would have said "remote" for both).
    if isinstance(error, h11.RemoteProtocolError) and connection.closed:
        return "the worker closed the connection before a complete response"
    if isinstance(error, MalformedAnswer):  # the router's own words, no byte of the worker's
        return f"malformed response: {error}"
    if isinstance(error, (h11.ProtocolError, ValueError)):
        # A parser's message quotes the worker's bytes (a header line, a chunk size): a
        # worker's Set-Cookie must not reach the access log.
        return f"malformed response ({type(error).__name__})"
    return str(error) or type(error).__name__
