"""ConnectFailover: for requests mitmproxy forwards, probe the chosen worker within the connect
timeout before mitmproxy connects, and move the connection to the next worker if it does not
answer (mitmproxy itself would answer the client 502)."""

from __future__ import annotations

from mitmproxy.proxy.server_hooks import ServerConnectionHookData

from ..edge.connect import open_socket
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
        flow = state.connecting.pop(data.client.id, None)
        decision = flowdata.decision(flow) if flow is not None else None
        if flow is None or decision is None or decision.upstream is None:
            return
        if data.server.address != (decision.upstream.host, decision.upstream.port):
            return
        tried: set[str] = set()
        while (upstream := decision.upstream) is not None:
            error = await probe(upstream, state.workers.config.connect_timeout)
            if error is None:
                break
            # Each failover excludes the failed worker, so this ends at main at the latest.
            if not error.startswith("no connection within"):
                self.health.mark_down(upstream.url, f"connect failed: {error}")
            decision = self.routing.fail_over(flow, decision, tried, "connect", error, answer=False)
        if decision.writer_down:  # no writer left: the connection fails, StreamedErrors answers 503
            data.server.error = "no usable stream writer"
            return
        target = decision.upstream or state.main
        if target is not None:
            data.server.address = (target.host, target.port)


async def probe(upstream: Upstream, timeout: float) -> str | None:
    """None if a TCP connection to the worker opens within the timeout (judged by the kernel,
    not by how late this busy loop looks: connect.py), else why not."""
    try:
        sock = await open_socket(upstream.host, upstream.port, timeout)
    except TimeoutError:
        return f"no connection within {timeout:g}s"
    except OSError as e:
        return e.strerror or type(e).__name__
    sock.close()
    return None
