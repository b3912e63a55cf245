"""A live client connection as mitmproxy 12.3 holds it: no public API closes an idle client
connection, writes on it outside a flow, or shows a head before it is complete. What this
relies on (tests/unit/test_compat_connections.py runs each against a real Proxyserver):
 - the Proxyserver addon ("proxyserver") keeps `connections`: client id -> ConnectionHandler;
 - a ConnectionHandler's `transports[handler.client]` is a ConnectionIO with the `handler`
   task reading the client, its `reader` (asyncio.StreamReader) and `writer`;
   cancelling that task closes the client cleanly (as mitmproxy's own tcp_timeout does);
 - the client's reader is only read after the `client_connected` hook has returned;
 - the HTTP/1 server layer (`layers.http._http1.Http1Server`) keeps the unparsed bytes of a
   head in `buf` while its `state` is `read_headers`; HttpLayer maps the client to it in
   `connections`, and the layer stack is `handler.layer.context.layers`;
 - asyncio's StreamReader keeps what its transport read and nobody has read from it yet in
   `_buffer`, its end in `_eof`, waits for either with `_wait_for_data`, keeps in `_paused`
   whether its own flow control paused the transport (past twice `_limit`); the selector
   transport reads up to its `max_size` bytes at a time (CPython 3.12; uvloop's has none).
"""

from __future__ import annotations

import asyncio
import select
import weakref
from collections.abc import Callable
from typing import Any

from mitmproxy import ctx
from mitmproxy.proxy.layers.http import HttpLayer

from ..edge.limits import CORS_HEADERS, too_large_body

READ_SIZE = 65535  # bytes: what mitmproxy reads from a client at a time (ConnectionHandler.handle_connection)
HEAD_READ = 4096  # bytes: what it is given at a time while it reads a request head
HOLD_LIMIT = 4096  # bytes: the StreamReader's limit while a hold leaves the socket read


def connection_handler(client_id: str) -> Any:
    """The ConnectionHandler of a live client connection, or None."""
    master = getattr(ctx, "master", None)
    proxyserver = master.addons.get("proxyserver") if master is not None else None
    return proxyserver.connections.get(client_id) if proxyserver is not None else None


def client_io(client_id: str) -> Any:
    """The ConnectionIO (task, reader, writer) of a live client connection, or None."""
    handler = connection_handler(client_id)
    return handler.transports.get(handler.client) if handler is not None else None


def unsent_bytes(io: Any) -> int:
    """Bytes written to the client and not yet sent (a slow reader)."""
    transport = getattr(io.writer, "transport", None)
    return int(transport.get_write_buffer_size()) if transport is not None else 0


def nothing_received(client_id: str) -> bool:
    """Whether a live client connection has sent nothing at all yet: no byte read by mitmproxy,
    none waiting in its reader or in the kernel (False when that cannot be told: no HeadGuard)."""
    io = client_io(client_id)
    guard = getattr(io, "reader", None)
    if not isinstance(guard, HeadGuard) or guard.received or guard.buffered():
        return False
    transport = getattr(io.writer, "transport", None)
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None:
        return False
    readable, _, _ = select.select([sock.fileno()], [], [], 0)  # a byte or the client's FIN waits
    return not readable


def hold_reading(client_id: str, pause: bool = True) -> Callable[[], None]:
    """Stop reading the client's connection until the returned function is called. mitmproxy
    reads a client without pause, a request's body included while a hook holds the request (its
    events queue in the paused layer). Done by the connection's HeadGuard, which mitmproxy's
    read loop calls; a no-op for a connection gone or without one.

    `pause`: the transport stops reading from the socket too, so what the client sends
    meanwhile waits in the kernel, whose full buffers close the TCP window. Without it the
    transport goes on filling the StreamReader until its own flow control pauses it: past twice
    its 64 KiB limit, with a last read of up to 256 KiB (an outside trial measured about 490 KB
    per waiting 1 MB upload); but a client that leaves is seen at once."""
    io = client_io(client_id)
    guard = getattr(io, "reader", None)
    if not isinstance(guard, HeadGuard):
        return _nothing
    transport = getattr(io.writer, "transport", None) if pause else None
    return guard.hold(transport)


def _nothing() -> None:
    return None


def close_client(io: Any, reason: str) -> None:
    """Close the connection as mitmproxy's own tcp_timeout does: cancel the task reading it."""
    if io.handler is not None:
        io.handler.cancel(f"synapse-router: {reason}")


class HeadGuard:
    """Wraps a client's StreamReader: after each read it looks at what mitmproxy's HTTP/1 layer
    holds of a head not yet complete, and once that exceeds the limit it answers 431 and
    closes the connection (mitmproxy 12.3 buffers a head without limit until its blank line);
    while held (`hold`), reads wait."""

    def __init__(self, reader: asyncio.StreamReader, handler: Any, limit: int, on_close: Callable[[str], None]):
        self._reader = reader
        self._handler_ref = weakref.ref(handler)  # the handler holds this reader: no cycle
        self._limit = limit
        self._on_close = on_close
        self._http1: Any = None
        self._held: asyncio.Event | None = None  # set: reads wait for it (hold_reading)
        self.received = False  # mitmproxy has read a byte of the connection
        self._after_head = False  # the last read was (part of) a request head
        self._pausing: Any = None  # the transport, paused by `read` for a head's hooks

    @classmethod
    def install(cls, client_id: str, limit: int, on_close: Callable[[str], None]) -> None:
        handler = connection_handler(client_id)
        io = handler.transports.get(handler.client) if handler is not None else None
        if io is None or not isinstance(io.reader, asyncio.StreamReader):
            return
        io.reader = cls(io.reader, handler, limit, on_close)
        transport: Any = getattr(io.writer, "transport", None)
        if isinstance(getattr(transport, "max_size", None), int):
            # CPython's selector transport reads up to 256 KiB at a time, four of mitmproxy's
            # reads (64 KiB): what one read takes in before a hold pauses it stays in the router.
            transport.max_size = READ_SIZE

    def __getattr__(self, name: str) -> Any:
        return getattr(self._reader, name)

    def hold(self, transport: asyncio.ReadTransport | None = None) -> Callable[[], None]:
        """Reads wait until the returned function is called (once held, again: the same hold);
        `transport`, if given and reading, is paused meanwhile."""
        held = self._held = self._held or asyncio.Event()
        paused = transport is not None and (transport.is_reading() or transport is self._pausing)
        if transport is not None and transport is self._pausing:
            self._pausing = None  # paused by `read` for the head's hooks: this hold's now
        elif paused:
            assert transport is not None
            transport.pause_reading()
        reader = self._reader
        # Not paused, the socket is still read (its close is seen at once), but the reader's own
        # flow control pauses it past twice HOLD_LIMIT, not twice 64 KiB (a request pipelined
        # behind the held one would fill it).
        limit = reader._limit  # type: ignore[attr-defined]
        lowered = transport is None and limit > HOLD_LIMIT
        if lowered:
            reader._limit = HOLD_LIMIT  # type: ignore[attr-defined]

        def release() -> None:
            if self._held is held:
                self._held = None
            held.set()
            if lowered:
                reader._limit = limit  # type: ignore[attr-defined]
            # Resumed unless the StreamReader paused it first (past twice its limit): the
            # reader resumes it once drained, and resumed now it would never pause again.
            if paused and transport is not None and not transport.is_closing() and not self._reader._paused:  # type: ignore[attr-defined]
                transport.resume_reading()

        return release

    async def read(self, n: int = -1) -> bytes:
        handler = self._handler_ref()
        if self._after_head and self._reader._buffer and handler is not None:  # type: ignore[attr-defined]
            await self._turns_for_the_heads_hooks(handler)
        head = self._after_head = handler is not None and self._reading_head(handler)
        if head and self._head_bytes(handler) > self._limit:
            self._answer_too_large(handler)
            return b""  # mitmproxy sees the client close
        if head and not 0 <= n <= HEAD_READ:
            n = HEAD_READ  # a head in small parts: little of what follows it comes with it
        # Wait for bytes before taking them, and take none while held: mitmproxy's next read is
        # already waiting when a hook holds the request, and would take up to 64 KiB of a body
        # as it came. A client that leaves while held is let through at once (EOF, an error).
        reader = self._reader
        while reader.exception() is None:
            if reader._buffer:  # type: ignore[attr-defined]
                if self._held is None:
                    break
                await self._held.wait()
            elif reader._eof:  # type: ignore[attr-defined]
                break
            else:
                await reader._wait_for_data("read")  # type: ignore[attr-defined]
        data = await self._reader.read(n)
        if data:
            self.received = True
        return data

    async def _turns_for_the_heads_hooks(self, handler: Any) -> None:
        """Bytes wait right behind (part of) a head: loop turns for the hooks it started
        (choosing the layer; then, once the head is complete, its `requestheaders`), with the
        socket not read meanwhile. One of them may hold the request: a paced request's body
        then stays in the kernel, not in mitmproxy's layer (which takes all it is given,
        whatever the request's hooks do) nor in the reader."""
        io = handler.transports.get(handler.client)
        transport = getattr(getattr(io, "writer", None), "transport", None)
        if transport is not None and transport.is_reading():
            transport.pause_reading()
            self._pausing = transport
        try:
            await asyncio.sleep(0)
            if not self._reading_head(handler):
                await asyncio.sleep(0)
        finally:
            pausing, self._pausing = self._pausing, None
            if pausing is not None and not pausing.is_closing():  # no hold took the pause over
                reader = self._reader
                if len(reader._buffer) > 2 * reader._limit:  # type: ignore[attr-defined]
                    # Left paused as the reader's own flow control would (a hold may have
                    # lowered its limit): it resumes the transport once read down.
                    reader._paused = True  # type: ignore[attr-defined]
                else:
                    pausing.resume_reading()

    def buffered(self) -> int:
        """Bytes the transport has read that mitmproxy has not read yet."""
        return len(self._reader._buffer)  # type: ignore[attr-defined]

    def _http1_layer(self, handler: Any) -> Any:
        """The client's HTTP/1 server layer, or None (not yet made, or not HTTP/1)."""
        if self._http1 is None:
            for layer in handler.layer.context.layers:
                if isinstance(layer, HttpLayer):
                    self._http1 = layer.connections.get(handler.client)
                    break
        return self._http1

    def _reading_head(self, handler: Any) -> bool:
        """Whether the client's next bytes are (part of) a request head: its HTTP/1 layer waits
        for one, or there is none yet (the connection's first bytes)."""
        http1 = self._http1_layer(handler)
        return http1 is None or getattr(getattr(http1, "state", None), "__name__", None) == "read_headers"

    def _head_bytes(self, handler: Any) -> int:
        """Bytes of an incomplete head the client's HTTP/1 layer holds (0 when it reads a body
        or is not HTTP/1)."""
        http1 = self._http1_layer(handler)
        if http1 is None or getattr(getattr(http1, "state", None), "__name__", None) != "read_headers":
            return 0
        return len(http1.buf)

    def _answer_too_large(self, handler: Any) -> None:
        client = handler.client
        body = too_large_body(self._limit)
        head = (
            b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: application/json\r\n"
            b"connection: close\r\ncontent-length: %d\r\n"
            % len(body)
            + b"".join(f"{name}: {value}\r\n".encode() for name, value in CORS_HEADERS)
            + b"\r\n"
        )
        io = handler.transports.get(client)
        if io is not None and io.writer is not None and not io.writer.is_closing():
            io.writer.write(head + body)
        self._http1.buf.maybe_extract_at_most(len(self._http1.buf))  # drop it: nothing to log or parse
        self._on_close(client.id)


def open_connections() -> int:
    """Client connections mitmproxy has registered (its Proxyserver's `connections`)."""
    master = getattr(ctx, "master", None)
    proxyserver = master.addons.get("proxyserver") if master is not None else None
    return len(proxyserver.connections) if proxyserver is not None else 0
