"""`RouterHttp1Server` is mitmproxy 12.3's HTTP/1 server layer (`layers.http._http1.Http1Server`,
the layer that reads a client's requests) with four request-side edge cases answered as nginx
answers them; `install()` makes HttpLayer use it for every client connection (HttpLayer builds
its server layer from the name `Http1Server` in `mitmproxy.proxy.layers.http`):

- empty lines before a request line are skipped (RFC 9112 2.2; a client appending CRLF after a
  body). mitmproxy's layer stops at the first one (h11's `maybe_extract_lines` consumes it and
  returns `[]`, which the layer takes for "head not complete") and waits for bytes that the
  client, waiting for its answer, never sends. At most MAX_EMPTY_LINES are skipped per
  request; more is answered 400 and closed.
- a chunked body h11 refuses (a size that is not 1-20 hex digits, data longer than its size,
  ...), a chunk line ended by a bare LF (h11 waits for a CRLF that never comes) and a chunk
  line or trailer section longer than MAX_CHUNK_LINE (h11 would buffer it without limit) are
  answered with a Matrix 400 and the connection closed (mitmproxy closes without a status
  line, or waits); the flow's error says so (clienterrors.message), for the access log.
- trailer fields after a chunked body are dropped (mitmproxy 12.3 raises NotImplementedError:
  no answer, the connection held until tcp_timeout).
- a body that gets no byte for limits.body_timeout while it is read: the BodyWatch given to
  `install` (ConnectionLimits' own) calls its `on_timeout`, and ConnectionLimits answers 408
  and closes (mitmproxy has no body timer, only tcp_timeout).
- the HTTP/2 prior-knowledge preface (`PRI * HTTP/2.0`) is answered 505 like any other version
  (mitmproxy's DisableH2C kills it silently; the router answers HTTP/1 only).
- a worker's response head that mitmproxy's HttpLayer refuses (`validate_inbound_headers`:
  both Content-Length and Transfer-Encoding, two Transfer-Encoding fields, a header name that
  is not a token, Transfer-Encoding on HTTP/1.0) is answered with a Matrix 502 instead of
  mitmproxy's HTML page (the HttpLayer sends this layer a ResponseProtocolError with
  RESPONSE_VALIDATION_FAILED after the `error` hook, without checking for a killed flow, so the
  hook cannot answer it in its place: StreamedErrors records the 502 for the access log).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any

import h11
from h11._readers import ChunkedReader
from mitmproxy.connection import ConnectionState
from mitmproxy.net.http import http1
from mitmproxy.proxy import commands, events
from mitmproxy.proxy.layers import http as http_layers
from mitmproxy.proxy.layers.http._base import ReceiveHttp
from mitmproxy.proxy.layers.http._events import ErrorCode, HttpEvent, RequestProtocolError, ResponseProtocolError
from mitmproxy.proxy.layers.http._http1 import Http1Server

from ..addons.responses import matrix_error
from ..edge import clienterrors

MAX_CHUNK_LINE = 16384  # bytes of a chunk line (size and extensions) or trailer section held
MAX_EMPTY_LINES = 16  # nginx skips any number; a flood of them is not a client's CRLF after a body
PREFACE = b"PRI * HTTP/2.0\r\n"

Commands = Generator[commands.Command, Any, None]


@dataclass(slots=True)
class BodyWatch:
    """limits.body_timeout, held by ConnectionLimits: when a request body being read gets no
    byte for `timeout` seconds, `on_timeout(client id)` answers and closes the connection, or
    returns False when that silence is not the client's (the router's hook kept the request
    waiting): then the body gets another `timeout` from now."""

    timeout: float = 60.0
    on_timeout: Callable[[str], bool] | None = None
    # (client id, clienterrors reason): the router answered a request whose body it could not
    # read; the flow's error may not say so (mitmproxy keeps its own when the request was
    # already being sent on, or answered), so the request in flight is marked for the log
    on_client_error: Callable[[str, str], None] | None = None


def _answer(status: int, errcode: str, text: str) -> bytes:
    response = matrix_error(status, errcode, text)
    response.headers["Connection"] = "close"
    return bytes(http1.assemble_response(response))  # type: ignore[no-untyped-call]


INVALID_WORKER_HEAD = (502, "M_UNKNOWN", "The server gave an invalid response.")


class RouterHttp1Server(Http1Server):
    """mitmproxy's HTTP/1 server layer with the edge cases of the module docstring."""

    body_watch: BodyWatch | None = None  # set on the class `install` makes; None: no body timer
    _preface_checked = False
    _body_timer: asyncio.TimerHandle | None = None
    _body_last = 0.0  # loop time of the last body bytes (or of the head)

    def send(self, event: HttpEvent) -> Commands:
        if (
            isinstance(event, ResponseProtocolError)
            and event.code == ErrorCode.RESPONSE_VALIDATION_FAILED
            and self.response is None
            and self.conn.state & ConnectionState.CAN_WRITE
        ):
            # mitmproxy refused the worker's head: a Matrix error in place of its HTML page.
            yield commands.SendData(self.conn, _answer(*INVALID_WORKER_HEAD))
            yield commands.CloseConnection(self.conn)
            return
        yield from super().send(event)

    def read_headers(self, event: events.ConnectionEvent) -> Commands:
        if not isinstance(event, events.DataReceived):
            yield from super().read_headers(event)
            return
        if self.stream_id == 1 and not self._preface_checked and len(self.buf) >= len(PREFACE):
            self._preface_checked = True  # once: a head trickled in must not be copied per byte
            if bytes(self.buf)[: len(PREFACE)] == PREFACE:
                yield from self._refuse(_answer(505, "M_UNRECOGNIZED", "HTTP version not supported."))
                return
        before = len(self.buf)
        yield from super().read_headers(event)
        if self.state == self.read_headers and 0 < len(self.buf) < before:
            # h11 took an empty line (the buffer shrank, no head was parsed): look again.
            for _ in range(MAX_EMPTY_LINES):
                before = len(self.buf)
                yield from super().read_headers(event)
                if self.state != self.read_headers or not 0 < len(self.buf) < before:
                    return
            yield from self._refuse(_answer(400, "M_UNRECOGNIZED", "Too many empty lines before the request line."))

    def _refuse(self, answer: bytes) -> Commands:
        self.buf.maybe_extract_at_most(len(self.buf))
        yield commands.SendData(self.conn, answer)
        yield commands.CloseConnection(self.conn)
        self.state = self.done

    def _bad_body(self, event: events.Event, message: str) -> Commands:
        """The body cannot be read: a 400 if it was the bytes the client sent (not its leaving
        mid-body), and the connection closed either way."""
        self._body_done()
        if isinstance(event, events.DataReceived):
            self.buf.maybe_extract_at_most(len(self.buf))  # nothing more is read from it
            error = clienterrors.ERRORS[clienterrors.BAD_CHUNKED_BODY]
            message = clienterrors.message(error)  # h11's message quotes the client's bytes
            if self.body_watch is not None and self.body_watch.on_client_error is not None:
                self.body_watch.on_client_error(self.conn.id, error.reason)
            if self.response is None and self.conn.state & ConnectionState.CAN_WRITE:
                yield commands.SendData(self.conn, _answer(error.status, error.errcode, error.text))
        yield commands.CloseConnection(self.conn)
        assert self.stream_id is not None
        yield ReceiveHttp(RequestProtocolError(self.stream_id, message, code=ErrorCode.GENERIC_CLIENT_ERROR))

    def _stuck_chunk_line(self) -> bool:
        """h11's chunked reader waits for more with bytes in the buffer: only for a chunk line or
        trailer section not yet complete. It has no limit of its own (a line that never ends is
        buffered whole), and ends a chunk line only at CRLF, so a client that ends it with a
        bare LF would wait for an answer forever: both are bad framing."""
        pending = len(self.buf)
        if not pending or not isinstance(self.body_reader, ChunkedReader):
            return False
        if pending > MAX_CHUNK_LINE:
            return True
        if getattr(self.body_reader, "_reading_trailer", False):
            return False  # h11 ends trailer lines at a bare LF too
        data = bytes(self.buf)  # at most MAX_CHUNK_LINE bytes
        lf = data.find(b"\n")
        return lf >= 0 and (lf == 0 or data[lf - 1] != 0x0D)

    def _body_arrived(self) -> None:
        """Body bytes arrived and more are to come: a timer (one per body, moved only when it
        fires) checks that they keep coming; a request without a body never sets one."""
        if self.body_watch is None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no event loop: the layer driven by a unit test
            return
        self._body_last = loop.time()
        if self._body_timer is None:
            self._body_timer = loop.call_at(self._body_last + self.body_watch.timeout, self._check_body)

    def _body_done(self) -> None:
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None

    def _check_body(self) -> None:
        self._body_timer = None
        watch = self.body_watch
        if watch is None or self.state != self.read_body or not self.conn.state & ConnectionState.CAN_READ:
            return
        loop = asyncio.get_running_loop()
        due = self._body_last + watch.timeout
        if loop.time() < due:
            self._body_timer = loop.call_at(due, self._check_body)
        elif watch.on_timeout is not None and not watch.on_timeout(self.conn.id):
            self._body_last = loop.time()
            self._body_timer = loop.call_at(self._body_last + watch.timeout, self._check_body)

    def read_body(self, event: events.Event) -> Commands:
        """mitmproxy 12.3's read_body, but a framing error is answered, trailers dropped and
        the time between body bytes watched."""
        assert self.stream_id is not None
        while True:
            try:
                if isinstance(event, events.DataReceived):
                    h11_event = self.body_reader(self.buf)
                elif isinstance(event, events.ConnectionClosed):
                    h11_event = self.body_reader.read_eof()
                else:
                    raise AssertionError(f"Unexpected event: {event}")
            except h11.ProtocolError as e:
                yield from self._bad_body(event, f"HTTP/1 protocol error: {e}")
                return
            if h11_event is None:
                if isinstance(event, events.DataReceived):
                    if self._stuck_chunk_line():
                        yield from self._bad_body(event, "")
                    else:
                        self._body_arrived()
                return
            if isinstance(h11_event, h11.Data):
                data = bytes(h11_event.data)
                if data:
                    yield ReceiveHttp(self.ReceiveData(self.stream_id, data))
            elif isinstance(h11_event, h11.EndOfMessage):
                assert self.request
                self._body_done()
                # Trailer fields (h11_event.headers) are dropped: nothing the router passes on
                # needs them, and a worker behind it gets the body without them.
                if self.request.data.method.upper() != b"CONNECT":
                    yield ReceiveHttp(self.ReceiveEndOfMessage(self.stream_id))
                yield from self.mark_done(request=True)
                return


def install(watch: BodyWatch | None = None) -> None:
    """Make mitmproxy's HttpLayer build RouterHttp1Server for client connections, its body
    timer kept by `watch` (the caller's; None: no body timer). Installing again replaces the
    watch (the last addon to load owns it)."""
    layer = type("RouterHttp1Server", (RouterHttp1Server,), {"body_watch": watch})
    setattr(http_layers, "Http1Server", layer)  # noqa: B010  (not an exported name)


def installed() -> type[RouterHttp1Server] | None:
    """The layer class HttpLayer builds now, if it is one `install` made."""
    layer = getattr(http_layers, "Http1Server", None)
    return layer if isinstance(layer, type) and issubclass(layer, RouterHttp1Server) else None
