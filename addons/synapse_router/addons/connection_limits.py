"""ConnectionLimits: the mitmproxy addon that enforces the `limits` configuration (limits.py)
on client connections: header and keep-alive timers, oversized heads, the connection cap, the
per-address bounds (edge/address_limits.py: checked at accept through ListenBacklog's screen,
and exactly when mitmproxy reports the client), and descriptor exhaustion that never floods the
log.

The mitmproxy internals it needs (a live connection's reader, writer and task; the head
mitmproxy's HTTP/1 layer holds) are in compat/connections.py, with behavioural tests.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from mitmproxy import http
from mitmproxy.net.http import http1

from ..compat import http1 as compat_http1
from ..compat.connections import HeadGuard as _HeadGuard
from ..compat.connections import client_io, nothing_received
from ..compat.connections import close_client as _close
from ..compat.connections import unsent_bytes as _unsent_bytes
from ..edge import clienterrors
from ..edge.address_limits import AddressBounds
from ..edge.descriptors import raise_nofile_limit
from ..edge.limits import (
    BODY_TIMEOUT,
    CORS_HEADERS,
    HEADER_TIMEOUT,
    HEADER_TOO_LARGE,
    KEEPALIVE_TIMEOUT,
    LOG_INTERVAL,
    RESOURCE_ERRNOS,
    LimitsConfig,
    Throttle,
    fd_budget_warning,
    fit_to_nofile,
    header_block_size,
    too_large_body,
)
from ..observability.loopfilters import LoopExceptionFilters
from . import flowdata
from .responses import matrix_error, respond

if TYPE_CHECKING:
    from mitmproxy import connection

    from ..config import RouterConfig
    from ..edge.client_address import IPNetwork
    from ..observability.metrics import RouterMetrics

log = logging.getLogger("synapse_router.edge.limits")


# --- the addon -------------------------------------------------------------------------------


@dataclass(slots=True)
class _Conn:
    """A client connection's state: the flows in flight on it, when it is closed if it stays
    without a request (loop time; None while a request is in flight) and why, and the timer
    that checks. The timer is not moved per exchange: when it fires before the deadline (the
    connection had requests since), it is set again for the deadline. So a busy keep-alive
    connection costs one timer per timeout period, not a timer made and cancelled per request."""

    flows: set[str] = field(default_factory=set)
    deadline: float | None = None
    reason: str = HEADER_TIMEOUT
    timer: asyncio.TimerHandle | None = None
    answered: bool = False  # a request has been answered on it (so, with no flows: idle keep-alive)
    since: float = 0.0  # loop time its current deadline was set: admitted, or its last exchange over
    body_flow: http.HTTPFlow | None = None  # the request in flight, whose body may still be arriving

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

    def __init__(
        self,
        metrics: RouterMetrics | None = None,
        config: LimitsConfig | None = None,
        loop_filters: LoopExceptionFilters | None = None,
    ) -> None:
        self.config = config or LimitsConfig()
        self.metrics = metrics
        # shared with GracefulStop: one handler on the event loop for both (loopfilters.py)
        self.loop_filters = loop_filters if loop_filters is not None else LoopExceptionFilters()
        self._conns: dict[str, _Conn] = {}  # client connection id -> state, for admitted clients
        self.addresses = AddressBounds(self.config)
        self._hosts: dict[str, str] = {}  # client connection id -> peer host, counted in self.addresses
        # True once new connections are screened at accept (the rate is charged there, not again
        # in client_connected); False on an event loop where that cannot be done (uvloop).
        self.screening = False
        self.body_watch = compat_http1.BodyWatch(self.config.body_timeout, self.body_timed_out, self.body_refused)
        self._nofile: int | None = None
        self._nofile_raised = False
        self._warned: int | None = None  # the max_connections last warned about
        self._noted: str | None = None  # the last derived max_connections logged (fit_to_nofile)
        self._refused = _ThrottledLog(
            lambda n: (
                f"synapse-router: refused {n} client connection(s) in the last {LOG_INTERVAL:g}s at most: "
                f"limits.max_connections={self.config.max_connections} connections open"
            ),
            logging.WARNING,
        )
        self._address_refused = _ThrottledLog(
            lambda n: (
                f"synapse-router: refused {n} client connection(s) in the last {LOG_INTERVAL:g}s at most: "
                f"per-address limits (limits.max_connections_per_address={self.config.max_connections_per_address}, "
                f"limits.connection_rate_per_address={self.config.connection_rate_per_address:g}/s); "
                f"last from {self._last_refused}"
            ),
            logging.WARNING,
        )
        self._last_refused = ""
        self._fd_errors = _ThrottledLog(
            lambda n: (
                f"synapse-router: out of file descriptors (or socket buffers): {n} failed accept(s) "
                f"in the last {LOG_INTERVAL:g}s at most; lower limits.max_connections or raise the open-files limit"
            ),
            logging.ERROR,
        )
        if metrics is not None:
            metrics.bind_client_connections(lambda: len(self._conns))

    @property
    def open_connections(self) -> int:
        return len(self._conns)

    @property
    def requests_in_flight(self) -> int:
        return sum(len(conn.flows) for conn in self._conns.values())

    def close_idle(self, reason: str, idle_for: float = 0.0) -> int:
        """Close every keep-alive connection with no request in flight and its last response
        sent `idle_for` seconds ago or more (not a new one still to send its first request); the
        number closed."""
        closed = 0
        idle_by = asyncio.get_running_loop().time() - idle_for
        for client_id, conn in list(self._conns.items()):
            if not conn.answered or conn.flows or conn.since > idle_by:
                continue
            if (io := client_io(client_id)) is not None and _unsent_bytes(io) == 0:
                conn.cancel_timer()
                _close(io, reason)
                closed += 1
        return closed

    def close_silent(self, reason: str, open_for: float) -> int:
        """Close every connection that has sent nothing at all (a browser's preconnect, a load
        balancer's warm connection) in the `open_for` seconds or more since it was admitted; the
        number closed. One with part of a head is not silent: its header_timeout stands."""
        closed = 0
        admitted_by = asyncio.get_running_loop().time() - open_for
        for client_id, conn in list(self._conns.items()):
            if conn.answered or conn.flows or conn.since > admitted_by or not nothing_received(client_id):
                continue
            if (io := client_io(client_id)) is not None:
                conn.cancel_timer()
                _close(io, reason)
                closed += 1
        return closed

    def close_all(self, reason: str) -> None:
        """Close every client connection, requests in flight and all."""
        for client_id, conn in list(self._conns.items()):
            conn.cancel_timer()
            if (io := client_io(client_id)) is not None:
                _close(io, reason)

    def headroom(self) -> int:
        """Client connections still admitted before `max_connections`."""
        return max(0, self.config.max_connections - len(self._conns))

    def prepare(self, config: RouterConfig) -> Callable[[], None]:
        return lambda: self.use(config.limits, config.trusted_proxies)

    def use(self, config: LimitsConfig, trusted: tuple[IPNetwork, ...] | None = None) -> None:
        """Switch to a configuration; running timers keep their deadlines. An unset
        max_connections is derived from the open-files limit (said once at info level)."""
        self._raise_nofile()
        config, note = fit_to_nofile(config, self._nofile)
        if note is not None and note != self._noted:
            log.info(f"synapse-router: {note}")
        self._noted = note
        self.config = config
        self.addresses.use(config, self.addresses.trusted if trusted is None else trusted)
        self.body_watch.timeout = config.body_timeout  # for bodies from now on
        self._check_fd_budget()

    # --- lifecycle ---

    def load(self, loader: Any) -> None:
        self._raise_nofile()
        # request-side edge cases of mitmproxy's HTTP/1 layer, bodies watched by this instance
        compat_http1.install(self.body_watch)

    def _raise_nofile(self) -> None:
        if not self._nofile_raised:
            self._nofile_raised = True
            self._nofile = raise_nofile_limit()

    def running(self) -> None:
        self.loop_filters.add(self._resource_error)

    def done(self) -> None:
        for conn in self._conns.values():
            conn.cancel_timer()
        self._refused.cancel()
        self._address_refused.cancel()
        self._fd_errors.cancel()
        self.loop_filters.remove(self._resource_error)

    def _check_fd_budget(self) -> None:
        if not self.config.max_connections_set:
            return  # derived to fit (use)
        warning = fd_budget_warning(self.config.max_connections, self._nofile)
        if warning is not None and self._warned != self.config.max_connections:
            self._warned = self.config.max_connections
            log.warning(f"synapse-router: {warning}")

    # --- per-address bounds ---

    def refuse_at_accept(self, host: str) -> bool:
        """Whether a connection just accepted from `host` is closed at once (ListenBacklog
        screens the listening sockets with this): before mitmproxy sees it."""
        reason = self.addresses.refusal(host)
        if reason is None:
            return False
        self._address_refusal(host, reason)
        return True

    def set_screening(self, on: bool) -> None:
        """ListenBacklog screens new connections with refuse_at_accept (True), or cannot."""
        self.screening = on

    def _address_refusal(self, host: str, reason: str) -> None:
        self._count_close(reason)
        self._last_refused = host  # the TCP peer's address: not a byte the client sent
        self._address_refused.hit()

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
        host = client.peername[0] if client.peername else ""
        if host:
            # Exact where the accept-time screen ran ahead of the count (a batch of accepts
            # before their clients were reported), and the only check where it cannot run.
            reason = self.addresses.opened(host, charge_rate=not self.screening)
            if reason is not None:
                client.error = f"synapse-router: {reason}"  # mitmproxy closes it at once
                self._address_refusal(host, reason)
                return
            self._hosts[client.id] = host
        conn = self._conns[client.id] = _Conn()
        self._set_deadline(client.id, conn, self.config.header_timeout, HEADER_TIMEOUT)
        _HeadGuard.install(client.id, self.config.max_header_bytes, self._head_too_large)

    def client_disconnected(self, client: connection.Client) -> None:
        host = self._hosts.pop(client.id, None)
        if host is not None:
            self.addresses.closed(host)
        conn = self._conns.pop(client.id, None)
        if conn is not None:
            conn.cancel_timer()

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        """A request's head has arrived: stop the connection's timer, and answer an oversized
        head (first in the router's chain, so nothing else is spent on it)."""
        conn = self._conns.get(flow.client_conn.id)
        if conn is None:
            return
        conn.deadline = None  # in flight: no timeout (the timer, if it fires, finds none)
        conn.flows.add(flow.id)
        conn.body_flow = flow  # answered 408 if its body stalls (self.body_watch)
        request = flow.request
        size = header_block_size(
            request.method, request.authority + request.path, request.http_version, request.headers.fields
        )
        if size > self.config.max_header_bytes and flow.response is None:
            respond(
                flow,
                http.Response.make(
                    431,
                    too_large_body(self.config.max_header_bytes),
                    {"Content-Type": "application/json", "Connection": "close", **dict(CORS_HEADERS)},
                ),
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
        conn.answered = True
        if conn.body_flow is flow:
            conn.body_flow = None
        if not conn.flows:
            self._set_deadline(flow.client_conn.id, conn, self.config.keepalive_timeout, KEEPALIVE_TIMEOUT)

    # --- timers ---

    def _set_deadline(self, client_id: str, conn: _Conn, delay: float, reason: str) -> None:
        """Close the connection `delay` seconds from now unless a request arrives first. A
        timer is made only if none would fire by then."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no event loop (a unit test calling a hook directly)
            return
        conn.since = loop.time()
        deadline = conn.deadline = conn.since + delay
        conn.reason = reason
        timer = conn.timer
        if timer is None or timer.when() > deadline:
            if timer is not None:
                timer.cancel()
            conn.timer = loop.call_at(deadline, self._expire, client_id)

    def _expire(self, client_id: str) -> None:
        conn = self._conns.get(client_id)
        if conn is None:
            return
        timer, conn.timer = conn.timer, None
        if conn.deadline is None or conn.flows:
            return  # in flight: the deadline is set again when it ends
        if timer is not None and conn.deadline > timer.when():
            # Requests came and went since this timer was set: wait for the latest deadline.
            conn.timer = asyncio.get_running_loop().call_at(conn.deadline, self._expire, client_id)
            return
        reason = conn.reason
        io = client_io(client_id)
        if io is None:
            return
        if reason == KEEPALIVE_TIMEOUT and _unsent_bytes(io) > 0:
            # The last response is still being sent to a slow client: not idle yet.
            self._set_deadline(client_id, conn, self.config.keepalive_timeout, reason)
            return
        log.debug(f"synapse-router: closing client connection {client_id}: {reason}")
        self._count_close(reason)
        _close(io, reason)

    def body_timed_out(self, client_id: str) -> bool:
        """No byte of the request body in flight for body_timeout seconds (self.body_watch):
        answer 408 if nothing was answered yet, mark the flow for the access log, and close.
        False (not timed out) while the router's routing hook waits on the request (its turn,
        whoami) or stopped waiting less than body_timeout ago: the client's silence is timed
        from the end of the router's wait at the earliest."""
        conn = self._conns.get(client_id)
        io = client_io(client_id)
        if conn is None or io is None:
            return True
        flow = conn.body_flow
        ended = flowdata.wait_ended(flow) if flow is not None else None
        if ended is not None and time.monotonic() - ended < self.config.body_timeout:
            return False
        if flow is not None:
            error = clienterrors.ERRORS[clienterrors.BODY_TIMEOUT]
            flowdata.set_client_error(flow, error.reason)
            if flow.response is None and io.writer is not None and not io.writer.is_closing():
                response = matrix_error(error.status, error.errcode, error.text)
                response.headers["Connection"] = "close"
                respond(flow, response)
                io.writer.write(http1.assemble_response(response))  # type: ignore[no-untyped-call]
                flowdata.set_upload_cut(flow)
        log.debug(f"synapse-router: closing client connection {client_id}: {BODY_TIMEOUT}")
        self._count_close(BODY_TIMEOUT)
        conn.cancel_timer()
        _close(io, BODY_TIMEOUT)
        return True

    def body_refused(self, client_id: str, reason: str) -> None:
        """The router answered the request in flight because its body's framing was bad
        (self.body_watch): the flow is marked for the access log."""
        conn = self._conns.get(client_id)
        if conn is not None and conn.body_flow is not None:
            flowdata.set_client_error(conn.body_flow, reason)

    def _head_too_large(self, client_id: str) -> None:
        """A head still incomplete beyond max_header_bytes (the _HeadGuard answered 431)."""
        if client_id in self._conns:
            self._count_close(HEADER_TOO_LARGE)

    def _count_close(self, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.observe_limit_close(reason)

    # --- event loop errors ---

    def _resource_error(self, context: dict[str, Any]) -> bool:
        """Collapse the event loop's out-of-descriptors errors (asyncio logs every failed accept
        with a traceback) into one line per interval; anything else is not this filter's."""
        exc = context.get("exception")
        if not (isinstance(exc, OSError) and exc.errno in RESOURCE_ERRNOS):
            return False
        if self.metrics is not None:
            self.metrics.observe_resource_error()
        self._fd_errors.hit()
        return True
