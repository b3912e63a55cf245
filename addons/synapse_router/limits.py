"""Resource limits on client connections, as nginx's: the `limits` key of the configuration.

    limits: {header_timeout: 60, keepalive_timeout: 75, max_header_bytes: 65536, max_connections: 10000}

- `header_timeout`: a new connection whose first request's headers are not complete within
  this many seconds of connecting is closed (nginx's `client_header_timeout`: a total for the
  head, so a client trickling a byte at a time gains nothing).
- `keepalive_timeout`: a connection with no request in flight is closed this many seconds after
  its last response; the next request's headers must be complete by then (mitmproxy shows an
  addon no request before its headers are complete, so a keep-alive connection's next request
  is bounded by this timer alone; real clients send a head in one packet). A request in flight
  (a long-poll waiting minutes for its response, an upload) is never cut by either timer.
- `max_header_bytes`: a request whose head (request line and header fields) is larger is
  answered 431 with a Matrix error `M_TOO_LARGE` and its connection closed; it reaches no
  worker (the router calls `headers_complete` first thing in its `requestheaders`, so no
  routing or whoami work is spent on it). A
  head that never ends is answered the same and closed once more than this much of it has
  been received (mitmproxy 12.3 itself has no limit: it buffers a head until its blank line).
- `max_connections`: client connections one router process holds at most; beyond, a new
  client is closed at once, counted in `synapse_router_client_connections_refused_total`, and
  reported in at most one log line per 10 s.

Start-up raises the soft open-files limit (RLIMIT_NOFILE) to the hard one and warns once if
`max_connections` does not fit in it (each client connection may hold an upstream one too).
When descriptors run out anyway, asyncio's accept errors (one traceback per failed accept,
tens of thousands a second) are collapsed into one log line per 10 s with a count.

The configuration half (LimitsConfig, parse_limits, Throttle, fd_budget_warning,
header_block_size) is pure; ConnectionLimits is the mitmproxy addon, a sub-addon of the router.
The mitmproxy internals it needs are in `_client_io` and `_HeadGuard` (see there).
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import math
import resource
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from mitmproxy import ctx, http
from mitmproxy.proxy.layers.http import HttpLayer

from .metrics import LIMIT_CLOSE_REASONS

if TYPE_CHECKING:
    from mitmproxy import connection

    from .metrics import RouterMetrics

log = logging.getLogger(__name__)

LOG_INTERVAL = 10.0  # seconds: at most one line per interval for refused connections / fd errors
FD_MARGIN = 256  # descriptors beyond 2 per client connection: workers, health checks, metrics, logs
RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})

# Why a connection was closed (a metric label: a fixed vocabulary).
HEADER_TIMEOUT = "header_timeout"
KEEPALIVE_TIMEOUT = "keepalive_timeout"
HEADER_TOO_LARGE = "header_too_large"
assert (HEADER_TIMEOUT, KEEPALIVE_TIMEOUT, HEADER_TOO_LARGE) == LIMIT_CLOSE_REASONS

TOO_LARGE_ERRCODE = "M_TOO_LARGE"


# --- configuration (pure) --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    header_timeout: float = 60.0  # seconds from connecting to the first request's complete head
    keepalive_timeout: float = 75.0  # seconds a connection may idle between requests
    max_header_bytes: int = 65536  # request line + header fields
    max_connections: int = 10000  # client connections per process


class LimitsConfigError(ValueError):
    """A bad `limits` value; `key` is the sub-key ("" for the mapping itself)."""

    def __init__(self, key: str, reason: str) -> None:
        self.key = key
        self.reason = reason
        super().__init__(f"limits.{key}: {reason}" if key else f"limits: {reason}")


_KEYS = ("header_timeout", "keepalive_timeout", "max_header_bytes", "max_connections")


def parse_limits(raw: object) -> LimitsConfig:
    """The `limits` mapping (None: the defaults); raise LimitsConfigError naming the key."""
    if raw is None:
        return LimitsConfig()
    if not isinstance(raw, dict):
        raise LimitsConfigError("", f"expected a mapping, got {type(raw).__name__}")
    for key in raw:
        if key not in _KEYS:
            raise LimitsConfigError(str(key), f"unknown key; expected one of {', '.join(sorted(_KEYS))}")
    d = LimitsConfig()

    def seconds(key: str, default: float) -> float:
        value = raw.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
            raise LimitsConfigError(key, f"must be a number > 0 (seconds), got {value!r}")
        return float(value)

    def count(key: str, default: int, minimum: int) -> int:
        value = raw.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise LimitsConfigError(key, f"must be an integer >= {minimum}, got {value!r}")
        return value

    return LimitsConfig(
        header_timeout=seconds("header_timeout", d.header_timeout),
        keepalive_timeout=seconds("keepalive_timeout", d.keepalive_timeout),
        # Below 1 KiB even an ordinary request with a token and a user agent would be refused.
        max_header_bytes=count("max_header_bytes", d.max_header_bytes, 1024),
        max_connections=count("max_connections", d.max_connections, 1),
    )


def header_block_size(method: str, target: str, version: str, fields: Iterable[tuple[bytes, bytes]]) -> int:
    """The size of a request head as sent: `METHOD target VERSION\\r\\n`, `name: value\\r\\n`
    per field and the blank line (the optional whitespace a client may add is not counted)."""
    size = len(method) + len(target) + len(version) + 4 + 2
    for name, value in fields:
        size += len(name) + len(value) + 4
    return size


def too_large_body(limit: int) -> bytes:
    """The Matrix error body of a 431 answer."""
    error = f"Request header fields too large (limit {limit} bytes)"
    return json.dumps({"errcode": TOO_LARGE_ERRCODE, "error": error}).encode()


def raise_nofile_limit() -> int | None:
    """Raise the soft RLIMIT_NOFILE to the hard limit; return the soft limit now in force
    (None where it cannot be read)."""
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (OSError, ValueError):
        return None
    if hard != soft and (hard == resource.RLIM_INFINITY or hard > soft):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (OSError, ValueError):  # e.g. an infinite hard limit above the kernel's nr_open
            pass
    return None if soft == resource.RLIM_INFINITY else soft


def fd_budget_warning(max_connections: int, nofile: int | None) -> str | None:
    """A warning when `max_connections` client connections, each with an upstream connection,
    plus a margin for the router's own connections do not fit in the open-files limit."""
    if nofile is None:
        return None
    needed = 2 * max_connections + FD_MARGIN
    if needed <= nofile:
        return None
    fits = (nofile - FD_MARGIN) // 2
    lower = f" or set limits.max_connections to at most {fits}" if fits >= 1 else ""
    return (
        f"limits.max_connections={max_connections} needs about {needed} file descriptors "
        f"(2 per connection + {FD_MARGIN}) but the open-files limit is {nofile}: raise it "
        f"(ulimit -n, LimitNOFILE=){lower}"
    )


class Throttle:
    """Counts events and says when to report them: the first at once, then at most one report
    per `interval` seconds, with the number of events since the last report."""

    def __init__(self, interval: float = LOG_INTERVAL) -> None:
        self.interval = interval
        self.pending = 0
        self.quiet_until = -math.inf

    def hit(self, now: float) -> int:
        """Count one event; return how many to report now (0: stay quiet)."""
        self.pending += 1
        return self.take(now)

    def take(self, now: float) -> int:
        """The events to report now, if the quiet period is over (0 otherwise)."""
        if now < self.quiet_until or not self.pending:
            return 0
        reported, self.pending = self.pending, 0
        self.quiet_until = now + self.interval
        return reported


# --- the addon -------------------------------------------------------------------------------


@dataclass(slots=True)
class _Conn:
    """A client connection's state: the flows in flight on it and its running timer."""

    flows: set[str] = field(default_factory=set)
    timer: asyncio.TimerHandle | None = None

    def cancel_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None


class _ThrottledLog:
    """One warning per interval at most for a repeated event, with the count; what is held
    back is reported when the interval ends."""

    def __init__(self, message: Callable[[int], str], level: int, interval: float = LOG_INTERVAL) -> None:
        self.message = message
        self.level = level
        self.throttle = Throttle(interval)
        self._flush: asyncio.TimerHandle | None = None

    def hit(self) -> None:
        loop = asyncio.get_running_loop()
        reported = self.throttle.hit(loop.time())
        if reported:
            log.log(self.level, self.message(reported))
        elif self._flush is None:
            self._flush = loop.call_at(self.throttle.quiet_until, self._flush_now)

    def _flush_now(self) -> None:
        self._flush = None
        reported = self.throttle.take(asyncio.get_running_loop().time())
        if reported:
            log.log(self.level, self.message(reported))

    def cancel(self) -> None:
        if self._flush is not None:
            self._flush.cancel()
            self._flush = None


class ConnectionLimits:
    """Enforces LimitsConfig on client connections (a sub-addon of SynapseRouter, which hands
    it the configuration with `use`)."""

    def __init__(self, metrics: RouterMetrics | None = None, config: LimitsConfig | None = None) -> None:
        self.config = config or LimitsConfig()
        self.metrics = metrics
        self._conns: dict[str, _Conn] = {}  # client connection id -> state, for admitted clients
        self._nofile: int | None = None
        self._nofile_raised = False
        self._warned: int | None = None  # the max_connections last warned about
        self._refused = _ThrottledLog(
            lambda n: (
                f"synapse-router: refused {n} client connection(s) in the last {LOG_INTERVAL:g}s at most: "
                f"limits.max_connections={self.config.max_connections} connections open"
            ),
            logging.WARNING,
        )
        self._fd_errors = _ThrottledLog(
            lambda n: (
                f"synapse-router: out of file descriptors (or socket buffers): {n} failed accept(s) "
                f"in the last {LOG_INTERVAL:g}s at most; lower limits.max_connections or raise the open-files limit"
            ),
            logging.ERROR,
        )
        self._loop_handler: Any = None
        self._previous_handler: Any = None
        if metrics is not None:
            metrics.bind_client_connections(lambda: len(self._conns))

    @property
    def open_connections(self) -> int:
        return len(self._conns)

    def use(self, config: LimitsConfig) -> None:
        """Switch to a configuration; running timers keep their deadlines."""
        self.config = config
        self._check_fd_budget()

    # --- lifecycle ---

    def load(self, loader: Any) -> None:
        self._raise_nofile()

    def _raise_nofile(self) -> None:
        if not self._nofile_raised:
            self._nofile_raised = True
            self._nofile = raise_nofile_limit()

    def running(self) -> None:
        self._install_exception_handler()

    def done(self) -> None:
        for conn in self._conns.values():
            conn.cancel_timer()
        self._refused.cancel()
        self._fd_errors.cancel()
        self._restore_exception_handler()

    def _check_fd_budget(self) -> None:
        self._raise_nofile()
        warning = fd_budget_warning(self.config.max_connections, self._nofile)
        if warning is not None and self._warned != self.config.max_connections:
            self._warned = self.config.max_connections
            log.warning(f"synapse-router: {warning}")

    # --- hooks ---

    def client_connected(self, client: connection.Client) -> None:
        if client.error:  # already refused
            return
        if len(self._conns) >= self.config.max_connections:
            client.error = "synapse-router: limits.max_connections reached"  # mitmproxy closes it at once
            if self.metrics is not None:
                self.metrics.observe_refused_connection()
            self._refused.hit()
            return
        conn = self._conns[client.id] = _Conn()
        conn.timer = self._start_timer(client.id, self.config.header_timeout, HEADER_TIMEOUT)
        _HeadGuard.install(client.id, self.config.max_header_bytes, self._head_too_large)

    def client_disconnected(self, client: connection.Client) -> None:
        conn = self._conns.pop(client.id, None)
        if conn is not None:
            conn.cancel_timer()

    def headers_complete(self, flow: http.HTTPFlow) -> None:
        """A request's head has arrived: stop the connection's timer, and answer an oversized
        head. Called by the router before anything else it does with the request."""
        conn = self._conns.get(flow.client_conn.id)
        if conn is None:
            return
        conn.cancel_timer()
        conn.flows.add(flow.id)
        request = flow.request
        size = header_block_size(
            request.method, request.authority + request.path, request.http_version, request.headers.fields
        )
        if size > self.config.max_header_bytes and flow.response is None:
            flow.response = http.Response.make(
                431,
                too_large_body(self.config.max_header_bytes),
                {"Content-Type": "application/json", "Connection": "close"},
            )
            self._count_close(HEADER_TOO_LARGE)

    def response(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None and flow.response.status_code == 101:
            return  # an upgraded connection (WebSocket) stays busy until it closes
        self._exchange_done(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self._exchange_done(flow)

    def _exchange_done(self, flow: http.HTTPFlow) -> None:
        conn = self._conns.get(flow.client_conn.id)
        if conn is None or flow.id not in conn.flows:
            return
        conn.flows.discard(flow.id)
        if not conn.flows:
            conn.cancel_timer()
            conn.timer = self._start_timer(flow.client_conn.id, self.config.keepalive_timeout, KEEPALIVE_TIMEOUT)

    # --- timers ---

    def _start_timer(self, client_id: str, delay: float, reason: str) -> asyncio.TimerHandle | None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no event loop (a unit test calling a hook directly)
            return None
        return loop.call_later(delay, self._expire, client_id, reason)

    def _expire(self, client_id: str, reason: str) -> None:
        conn = self._conns.get(client_id)
        if conn is None or conn.flows:
            return
        conn.timer = None
        io = _client_io(client_id)
        if io is None:
            return
        if reason == KEEPALIVE_TIMEOUT and _unsent_bytes(io) > 0:
            # The last response is still being sent to a slow client: not idle yet.
            conn.timer = self._start_timer(client_id, self.config.keepalive_timeout, reason)
            return
        log.debug(f"synapse-router: closing client connection {client_id}: {reason}")
        self._count_close(reason)
        _close(io, reason)

    def _head_too_large(self, client_id: str) -> None:
        """A head still incomplete beyond max_header_bytes (the _HeadGuard answered 431)."""
        if client_id in self._conns:
            self._count_close(HEADER_TOO_LARGE)

    def _count_close(self, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.observe_limit_close(reason)

    # --- event loop errors ---

    def _install_exception_handler(self) -> None:
        """Collapse the event loop's out-of-descriptors errors (asyncio logs every failed accept
        with a traceback) into one line per interval; pass anything else on."""
        loop = asyncio.get_running_loop()
        if self._loop_handler is not None and loop.get_exception_handler() is self._loop_handler:
            return
        previous = self._previous_handler = loop.get_exception_handler()

        def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
            exc = context.get("exception")
            if isinstance(exc, OSError) and exc.errno in RESOURCE_ERRNOS:
                if self.metrics is not None:
                    self.metrics.observe_resource_error()
                self._fd_errors.hit()
            elif previous is not None:
                previous(loop, context)
            else:
                loop.default_exception_handler(context)

        self._loop_handler = handler
        loop.set_exception_handler(handler)

    def _restore_exception_handler(self) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        if self._loop_handler is not None and loop.get_exception_handler() is self._loop_handler:
            loop.set_exception_handler(self._previous_handler)
        self._loop_handler = None


# --- mitmproxy internals (12.3) --------------------------------------------------------------
# No public API closes an idle client connection or shows a head before it is complete. What
# this relies on (tests/unit/test_limits.py fails if an upgrade removes it):
#  - the Proxyserver addon ("proxyserver") keeps `connections`: client id -> ConnectionHandler;
#  - a ConnectionHandler's `transports[handler.client]` is a ConnectionIO with the `handler`
#    task reading the client, its `reader` (asyncio.StreamReader) and `writer`;
#    cancelling that task closes the client cleanly (as mitmproxy's own tcp_timeout does);
#  - the client's reader is only read after the `client_connected` hook has returned;
#  - the HTTP/1 server layer (`layers.http._http1.Http1Server`) keeps the unparsed bytes of a
#    head in `buf` while its `state` is `read_headers`; HttpLayer maps the client to it in
#    `connections`, and the layer stack is `handler.layer.context.layers`.


def _connection_handler(client_id: str) -> Any:
    """The ConnectionHandler of a live client connection, or None."""
    master = getattr(ctx, "master", None)
    proxyserver = master.addons.get("proxyserver") if master is not None else None
    return proxyserver.connections.get(client_id) if proxyserver is not None else None


def _client_io(client_id: str) -> Any:
    """The ConnectionIO (task, reader, writer) of a live client connection, or None."""
    handler = _connection_handler(client_id)
    return handler.transports.get(handler.client) if handler is not None else None


def _unsent_bytes(io: Any) -> int:
    transport = getattr(io.writer, "transport", None)
    return int(transport.get_write_buffer_size()) if transport is not None else 0


def _close(io: Any, reason: str) -> None:
    if io.handler is not None:
        io.handler.cancel(f"synapse-router: {reason}")


class _HeadGuard:
    """Wraps a client's StreamReader: after each read it looks at what mitmproxy's HTTP/1 layer
    holds of a head not yet complete, and once that exceeds the limit it answers 431 and
    closes the connection (mitmproxy 12.3 buffers a head without limit until its blank line)."""

    def __init__(self, reader: asyncio.StreamReader, handler: Any, limit: int, on_close: Callable[[str], None]):
        self._reader = reader
        self._handler_ref = weakref.ref(handler)  # the handler holds this reader: no cycle
        self._limit = limit
        self._on_close = on_close
        self._http1: Any = None

    @classmethod
    def install(cls, client_id: str, limit: int, on_close: Callable[[str], None]) -> None:
        handler = _connection_handler(client_id)
        io = handler.transports.get(handler.client) if handler is not None else None
        if io is None or not isinstance(io.reader, asyncio.StreamReader):
            return
        io.reader = cls(io.reader, handler, limit, on_close)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._reader, name)

    async def read(self, n: int = -1) -> bytes:
        handler = self._handler_ref()
        if handler is not None and self._head_bytes(handler) > self._limit:
            self._answer_too_large(handler)
            return b""  # mitmproxy sees the client close
        return await self._reader.read(n)

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
            b"connection: close\r\ncontent-length: %d\r\n\r\n" % len(body)
        )
        io = handler.transports.get(client)
        if io is not None and io.writer is not None and not io.writer.is_closing():
            io.writer.write(head + body)
        self._http1.buf.maybe_extract_at_most(len(self._http1.buf))  # drop it: nothing to log or parse
        self._on_close(client.id)
