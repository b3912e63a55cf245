"""RouterSent: the requests the router sends itself (every request whose body it can hold, see
retry.py), so that a worker failing under them is invisible to the client where that is safe:
on a refused connection the request moves to the next worker, after a worker that gave no
response a request that is safe to repeat is resent once to the next one, and every failure
left is answered with a Matrix error (never mitmproxy's HTML page); a client that leaves
abandons its exchange. An answer too long to hold (upstream_client.StreamedAnswer) is handed to
mitmproxy through the loopback relay (relay.py), which streams it: from then on it is never
resent. Every wait for the worker is bounded by `health.read_timeout` (plus a long-poll's own
`timeout` while it waits for the head): then 504."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from mitmproxy import http
from mitmproxy.connection import ConnectionState
from mitmproxy.utils import asyncio_utils

from ..config import RouterConfig
from ..edge import upstream_client
from ..edge.relay import HEADER as RELAY_HEADER
from ..edge.relay import Relay
from ..routing.engine import Decision
from ..routing.retry import Sending, head_timeout
from . import credentials, flowdata
from .health import HealthChecks
from .responses import matrix_error, no_process_available, respond
from .routing import Routing
from .state import RouterState

CLIENT_SWEEP_INTERVAL = 1.0  # seconds between checks for clients that left a router-sent request


class RouterSent:
    def __init__(self, state: RouterState, routing: Routing, health: HealthChecks) -> None:
        self.state = state
        self.routing = routing
        self.health = health
        self._sending: dict[str, http.HTTPFlow] = {}  # flows in flight on this path, by flow id
        self._sweep: asyncio.Task[None] | None = None
        self.relay = Relay()

    def prepare(self, config: RouterConfig) -> Callable[[], None]:
        def switch() -> None:
            self.state.upstream.keep_only(config.worker_urls())
            self.state.upstream.set_buffers(config.limits.response_buffer, config.limits.buffer_budget)

        return switch

    def running(self) -> None:
        if self._sweep is None:
            self._sweep = asyncio_utils.create_task(
                self._abandon_left_forever(), name="router-sent client sweep", keep_ref=True
            )

    def done(self) -> None:
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        self.relay.close()
        self.state.upstream.close()

    def request(self, flow: http.HTTPFlow) -> Awaitable[None] | None:
        how = flowdata.sending(flow)
        if how is None or flow.response is not None:
            return None
        decision = flowdata.decision(flow)
        return None if decision is None else self._send(flow, decision, how)

    async def _send(self, flow: http.HTTPFlow, decision: Decision, how: Sending) -> None:
        """Send the request to its worker (or main); on a failed connection move on to the next
        worker (each failure marks one down, so this ends at main at the latest); after a worker
        that gave no response, resend once if `how` allows it. Every failure is answered with a
        Matrix error. A client that leaves abandons the exchange."""
        state = self.state
        request = flow.request
        method, path = request.method, request.path
        fields = request.headers.fields  # as sent, and given back if mitmproxy is to send it
        headers = upstream_client.request_headers(fields)
        body = request.raw_content or b""  # held (at most retry.MAX_HELD_REQUEST), to resend
        # A long-poll is in flight for up to minutes, in mitmweb's view: its token goes now.
        credentials.redact(flow)
        state.upstream.main_url = state.main.url if state.main is not None else None
        health = state.workers.config
        timeouts = {"read_timeout": health.read_timeout, "head_timeout": head_timeout(path, health.read_timeout)}
        resent = False
        tried: set[str] = set()
        while True:
            upstream = decision.upstream or state.main
            if upstream is None:  # not in reverse mode: mitmproxy forwards it as addressed
                self._hand_to_mitmproxy(flow, fields, path)
                return
            self._sending[flow.id] = flow
            try:
                answer = await state.upstream.send(
                    upstream,
                    method,
                    path,
                    headers,
                    state.workers.config.connect_timeout,
                    body,
                    owner=flow.id,
                    resendable=how is Sending.RESEND,
                    **timeouts,
                )
            except upstream_client.BadRequest:
                respond(flow, matrix_error(400, "M_INVALID_PARAM", "Invalid request header."))
                return
            except upstream_client.NoResponse as e:
                if not flow.client_conn.state & ConnectionState.CAN_READ:
                    flow.kill()  # type: ignore[no-untyped-call]  # the client left: nothing to answer
                    return
                if e.failure is upstream_client.Failure.READ_TIMEOUT:  # not resent: it may be slow
                    respond(flow, matrix_error(504, "M_UNKNOWN", "The server did not answer in time."))
                    return
                on_worker = decision.upstream is not None
                # A refused connection takes the worker down at once. A connect timeout or a
                # reset only moves this request: a burst filling the accept queue, or a client
                # abandoning its long-poll, look the same; the health checks judge the worker.
                if e.refused and decision.upstream is not None:
                    self.health.mark_down(decision.upstream.url, str(e))
                connect_failed = e.failure is not upstream_client.Failure.NO_RESPONSE
                if not connect_failed:  # the worker may have acted on the request
                    if how is not Sending.RESEND or resent:
                        respond(flow, matrix_error(502, "M_UNKNOWN", "The server gave no response."))
                        return
                    resent = True
                    state.metrics.observe_retry(decision.pool)
                if not on_worker:  # main was the last resort
                    respond(flow, self._unavailable(e.failure))
                    return
                reason = "connect" if connect_failed else "no_response"
                decision = self.routing.fail_over(flow, decision, tried, reason, str(e))
                if flow.response is not None:  # answered by the router: no writer left
                    return
                continue
            finally:
                self._sending.pop(flow.id, None)
            if isinstance(answer, upstream_client.StreamedAnswer):
                await self._hand_to_relay(flow, answer)
                return
            answer.timestamp_end = time.time()
            flow.response = answer
            return

    async def _hand_to_relay(self, flow: http.HTTPFlow, answer: upstream_client.StreamedAnswer) -> None:
        """Let mitmproxy forward the (redacted) request to the relay, which answers it with the
        worker's answer as it arrives; mitmproxy streams that to the client (Routing)."""
        try:
            port = await self.relay.start()
        except OSError:
            answer.close()
            respond(flow, matrix_error(502, "M_UNKNOWN", "The server gave no response."))
            return
        if not flow.live or not flow.client_conn.state & ConnectionState.CAN_READ:
            answer.close()
            flow.kill()  # type: ignore[no-untyped-call]  # the client left meanwhile
            return
        data = flow.request.data
        data.scheme, data.host, data.port = b"http", self.relay.host, port
        flow.request.headers[RELAY_HEADER] = self.relay.hand(answer)
        flowdata.set_sending(flow, None)
        flowdata.set_relayed(flow)

    def _unavailable(self, failure: upstream_client.Failure) -> http.Response:
        """No process could take the request: every worker of its chain and main failed."""
        retry_after = self.state.workers.config.retry_after
        if failure is upstream_client.Failure.NO_RESPONSE:
            return matrix_error(502, "M_UNKNOWN", "The server gave no response.", retry_after)
        if failure is upstream_client.Failure.CONNECT_TIMEOUT:
            return matrix_error(504, "M_UNKNOWN", "No Synapse process answered in time.", retry_after)
        return no_process_available(retry_after)

    def _hand_to_mitmproxy(self, flow: http.HTTPFlow, fields: tuple[tuple[bytes, bytes], ...], path: str) -> None:
        """Let mitmproxy forward the request to the flow's target, token and all."""
        credentials.restore(flow, fields, path)
        flowdata.set_sending(flow, None)
        decision = flowdata.decision(flow)
        if decision is not None and decision.upstream is not None:
            self.state.connecting[flow.client_conn.id] = flow

    async def _abandon_left_forever(self) -> None:
        """Close the worker connection of each router-sent exchange whose client has closed its
        connection, as mitmproxy does for the requests it forwards (so a client dropping
        long-polls cannot pin worker connections and descriptors)."""
        while True:
            await asyncio.sleep(CLIENT_SWEEP_INTERVAL)
            for flow_id, flow in list(self._sending.items()):
                if not flow.client_conn.state & ConnectionState.CAN_READ:
                    self.state.upstream.abandon(flow_id)
