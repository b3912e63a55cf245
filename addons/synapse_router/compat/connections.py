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
   `_buffer` (CPython 3.12).
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


def hold_reading(client_id: str) -> Callable[[], None]:
    """Stop reading the client's connection until the returned function is called: what it
    sends meanwhile waits in the asyncio StreamReader (which then pauses the socket: its own
    flow control, at twice its 64 KiB limit) and the kernel, whose full buffers close the TCP
    window; not in the router's memory. mitmproxy reads a client without pause, a request's
    body included while a hook holds the request (its events queue in the paused layer).
    Done by the connection's HeadGuard, which mitmproxy's read loop calls; a no-op for a
    connection gone or without one."""
    io = client_io(client_id)
    guard = getattr(io, "reader", None)
    if not isinstance(guard, HeadGuard):
        return _nothing
    return guard.hold()


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

    @classmethod
    def install(cls, client_id: str, limit: int, on_close: Callable[[str], None]) -> None:
        handler = connection_handler(client_id)
        io = handler.transports.get(handler.client) if handler is not None else None
        if io is None or not isinstance(io.reader, asyncio.StreamReader):
            return
        io.reader = cls(io.reader, handler, limit, on_close)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._reader, name)

    def hold(self) -> Callable[[], None]:
        """Reads wait until the returned function is called (once held, again: the same hold)."""
        held = self._held = self._held or asyncio.Event()

        def release() -> None:
            if self._held is held:
                self._held = None
            held.set()

        return release

    async def read(self, n: int = -1) -> bytes:
        if self._held is not None:
            await self._held.wait()
        handler = self._handler_ref()
        if handler is not None and self._head_bytes(handler) > self._limit:
            self._answer_too_large(handler)
            return b""  # mitmproxy sees the client close
        data = await self._reader.read(n)
        if data:
            self.received = True
        return data

    def buffered(self) -> int:
        """Bytes the transport has read that mitmproxy has not read yet."""
        return len(self._reader._buffer)  # type: ignore[attr-defined]

    def _head_bytes(self, handler: Any) -> int:
        """Bytes of an incomplete head the client's HTTP/1 layer holds (0 when it reads a body
        or is not HTTP/1)."""
        if self._http1 is None:
            for layer in handler.layer.context.layers:
                if isinstance(layer, HttpLayer):
                    self._http1 = layer.connections.get(handler.client)
                    break
            if self._http1 is None:
                return 0
        state = getattr(self._http1, "state", None)
        if getattr(state, "__name__", None) != "read_headers":
            return 0
        return len(self._http1.buf)

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
