"""ConnectFailover: for requests mitmproxy forwards, probe the chosen worker within the connect
timeout before mitmproxy connects, and move the connection to the next worker if it does not
answer (mitmproxy itself would answer the client 502). What to do after a failed probe is
failover.py's, as for the requests the router sends itself."""

from __future__ import annotations

from mitmproxy.proxy.server_hooks import ServerConnectionHookData

from ..edge.connect import open_socket
from ..routing import failover
from ..routing.exchange import FailureKind
from ..routing.failover import Step
from ..routing.upstream import Upstream
from . import flowdata
from .health import HealthChecks
from .routing import Routing
from .state import RouterState


class ConnectFailover:
    def __init__(self, state: RouterState, routing: Routing, health: HealthChecks) -> None:
        self.state = state
        self.routing = routing
        self.health = health

    async def server_connect(self, data: ServerConnectionHookData) -> None:
        state = self.state
        exchange = state.exchanges.take_connecting(data.client.id)
        if exchange is None or exchange.closed:
            return
        flow = exchange.flow
        decision = flowdata.decision(flow)
        if decision is None or decision.upstream is None:
            return
        if data.server.address != (decision.upstream.host, decision.upstream.port):
            return
        while (upstream := decision.upstream) is not None:
            failed = await probe(upstream, state.workers.config.connect_timeout)
            if failed is None:
                break
            failure, detail = failed
            verdict = failover.after_failure(
                failure,
                refused=failure is FailureKind.CONNECT_ERROR,
                over=exchange.closed,
                on_worker=True,
                resendable=False,
                resent=False,
            )
            if verdict.step is Step.GIVE_UP:  # the client left while the probe waited
                data.server.error = "the client has gone"
                return
            if verdict.mark_down:
                self.health.mark_down(upstream.url, f"connect failed: {detail}")
            # Each failover excludes the failed worker, so this ends at main at the latest.
            decision = self.routing.fail_over(flow, exchange, decision, verdict.reason, detail, answer=False)
        if decision.writer_down:  # no writer left: the connection fails, StreamedErrors answers 503
            data.server.error = "no usable stream writer"
            return
        target = decision.upstream or state.main
        if target is not None:
            data.server.address = (target.host, target.port)


async def probe(upstream: Upstream, timeout: float) -> tuple[FailureKind, str] | None:
    """None if a TCP connection to the worker opens within the timeout (judged by the kernel,
    not by how late this busy loop looks: connect.py), else how it failed and why."""
    try:
        sock = await open_socket(upstream.host, upstream.port, timeout)
    except TimeoutError:
        return FailureKind.CONNECT_TIMEOUT, f"no connection within {timeout:g}s"
    except OSError as e:
        return FailureKind.CONNECT_ERROR, e.strerror or type(e).__name__
    sock.close()
    return None
