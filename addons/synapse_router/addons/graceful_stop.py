"""GracefulStop: SIGTERM (or a first SIGINT) drains the router instead of cutting every
connection (`shutdown.grace`, shutdown.py); a second signal stops at once.

Draining: the listening sockets are closed at once, after the connections the loop accepted
have their transports and those still waiting in the accept queues have been accepted and
handed to mitmproxy (compat.listening.close_listener: either would be dropped or reset
otherwise, and a new router sharing the port with SO_REUSEPORT takes every later one); idle
keep-alive connections are closed once idle for a second (one in use more often gets its next
answer with `Connection: close`), and those that have sent nothing for a second (a
preconnect); a request waiting for its address's turn (request pacing) is answered 429 at
once, to be retried on the router that takes over; every request in flight is let finish and
answered with `Connection: close`, so its connection closes after it; once no client connection is left (or
the grace is over, and the rest are closed and counted in the log) mitmproxy is told to shut
down, which stops the health checks, whoami and the metrics listener through their `done`
hooks. Under mitmdump this replaces mitmproxy's own SIGINT/SIGTERM handlers (which stop at
once) in `running`.

The mitmproxy and asyncio internals it uses (each instance's asyncio servers, the connections
mitmproxy registered, serving a connection accepted here, asyncio's retry on a closed listener)
are in compat/listening.py and compat/connections.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable
from typing import Any

from mitmproxy import ctx, http
from mitmproxy.utils import asyncio_utils

from ..compat.connections import open_connections
from ..compat.listening import close_listener, closed_listener_retry, listening_servers, serve_accepted
from ..config import RouterConfig
from ..edge.shutdown import ShutdownConfig, drained_line, grace_over_line, immediate_line, stopping_line
from ..launcher.signals import on_signal
from .connection_limits import ConnectionLimits
from .state import RouterState

log = logging.getLogger("synapse_router")

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
POLL_INTERVAL = 0.05  # seconds between looks at the connections left while draining
CLOSE_WAIT = 5.0  # seconds the connections closed at the end of the grace get to go
IDLE_WAIT = 1.0  # seconds a keep-alive connection may be idle while draining before it is closed
SILENT_WAIT = 1.0  # seconds a connection that has sent nothing is kept while draining
SHUTDOWN_REASON = "shutdown"


class GracefulStop:
    def __init__(
        self, limits: ConnectionLimits, state: RouterState, on_stop: Callable[[], None] = lambda: None
    ) -> None:
        self.limits = limits
        self.state = state
        self.on_stop = on_stop  # told once a graceful stop begins (MetricsListener.stopping)
        self.config = ShutdownConfig()
        self._drain: asyncio.Task[None] | None = None
        self._handed_over: set[asyncio.Task[None]] = set()  # connections accepted while stopping

    @property
    def stopping(self) -> bool:
        return self._drain is not None

    def prepare(self, config: RouterConfig) -> Callable[[], None]:
        def switch() -> None:
            self.config = config.shutdown

        return switch

    def running(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            for signum in STOP_SIGNALS:
                # mitmdump's own handlers (loop.add_signal_handler) would stop at once.
                with contextlib.suppress(RuntimeError, ValueError):
                    loop.remove_signal_handler(signum)
                on_signal(signum, self.stop)
        except (RuntimeError, ValueError):
            log.info("synapse-router: graceful stop on SIGTERM unavailable here (not the main thread)")

    def done(self) -> None:
        if self._drain is not None and not self._drain.done():
            self._drain.cancel()
        self.limits.loop_filters.remove(self._closed_listener_retry)

    # --- the responses of a draining router close their connections ---

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        if self._drain is not None and flow.response is not None:
            flow.response.headers["connection"] = "close"

    def response(self, flow: http.HTTPFlow) -> None:
        self.responseheaders(flow)

    # --- stopping ---

    def stop(self) -> None:
        """The first call drains; a second one stops at once."""
        if self._drain is None:
            self.state.stopping = True  # `/ready` answers 503 from now on
            self.on_stop()
            self._drain = asyncio_utils.create_task(self._drain_then_shut_down(), name="graceful stop", keep_ref=True)
            return
        log.warning(immediate_line(self.limits.requests_in_flight, self._connections()))
        self.state.turns.end_all()
        self.limits.close_all(SHUTDOWN_REASON)
        ctx.master.shutdown()  # type: ignore[no-untyped-call]

    async def _drain_then_shut_down(self) -> None:
        loop = asyncio.get_running_loop()
        started = loop.time()
        grace = self.config.grace
        self._ignore_closed_listener_retries()
        paced = self.state.turns.end_all()  # answered 429 (retry on the router taking over)
        await self._stop_listening()
        idle = self._close_idle()
        left = max(0, self._connections() - idle)  # those just closed are still registered
        log.info(stopping_line(grace, idle, self.limits.requests_in_flight, left, paced))
        deadline = started + grace
        while self._connections() and loop.time() < deadline:
            await asyncio.sleep(POLL_INTERVAL)
            self._close_idle()  # answered meanwhile, its last bytes now sent, or silent since
        if self._connections():
            log.warning(grace_over_line(grace, self.limits.requests_in_flight, self._connections()))
            self.limits.close_all(SHUTDOWN_REASON)
            close_by = loop.time() + CLOSE_WAIT
            while self._connections() and loop.time() < close_by:
                await asyncio.sleep(POLL_INTERVAL)
        else:
            log.info(drained_line(loop.time() - started))
        ctx.master.shutdown()  # type: ignore[no-untyped-call]

    def _close_idle(self) -> int:
        """Close the keep-alive connections idle for IDLE_WAIT seconds or more, and those that
        have sent nothing since they were opened SILENT_WAIT seconds ago or more. One in use
        more often gets its next answer with `Connection: close` instead: closed at once, it
        would often meet a request its client is sending, which then gets no answer (a busy
        client, an outer proxy's pooled connection). A preconnect would otherwise hold the drain
        for the whole grace; one accepted at the stop gets SILENT_WAIT for its first byte."""
        idle = self.limits.close_idle(SHUTDOWN_REASON, IDLE_WAIT)
        return idle + self.limits.close_silent(SHUTDOWN_REASON, SILENT_WAIT)

    def _ignore_closed_listener_retries(self) -> None:
        """After accept() ran out of descriptors asyncio retries it 1 s later, once per failed
        accept (up to 100), and Server.close() does not cancel those retries (CPython 3.12): on a
        listener closed meanwhile each raises "Invalid file descriptor: -1", a traceback each.
        Those, and only those, are dropped while the router drains; anything else is reported."""
        self.limits.loop_filters.add(self._closed_listener_retry)

    @staticmethod
    def _closed_listener_retry(context: dict[str, Any]) -> bool:
        return closed_listener_retry(context)

    def _connections(self) -> int:
        """Client connections still open (or accepted while stopping and not yet registered)."""
        registered = open_connections()
        return max(registered, sum(1 for task in self._handed_over if not task.done()))

    async def _stop_listening(self) -> None:
        """Close the proxy's listening sockets, first accepting what waits in their queues."""
        proxyserver = ctx.master.addons.get("proxyserver")  # type: ignore[no-untyped-call]
        if proxyserver is None:
            return
        for instance in proxyserver.servers:
            for server in listening_servers(instance):
                # A stream server (a UDP mode's transport has no sockets); not isinstance(asyncio.Server):
                # uvloop's Server is no subclass of it, and its listeners would stay open.
                if getattr(server, "sockets", None) is None:
                    continue
                for conn in await close_listener(server):
                    task = asyncio_utils.create_task(
                        serve_accepted(instance.handle_stream, conn),
                        name="connection accepted while stopping",
                        keep_ref=True,
                    )
                    self._handed_over.add(task)
                    task.add_done_callback(self._handed_over.discard)
