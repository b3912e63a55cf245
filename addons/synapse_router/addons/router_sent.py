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
from ..routing import failover
from ..routing.engine import Decision
from ..routing.exchange import Exchange, FailureKind
from ..routing.failover import Answer, Step
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
        exchange = self.state.exchanges.find(flow.client_conn.id, flow.id)
        if exchange is None or exchange.sending is None or flow.response is not None:
            return None
        decision = flowdata.decision(flow)
        return None if decision is None else self._send(flow, exchange, decision, exchange.sending)

    async def _send(
        self, flow: http.HTTPFlow, exchange: Exchange[http.HTTPFlow], decision: Decision, how: Sending
    ) -> None:
        """Send the request to its worker (or main); after a failure, failover.py decides
        whether it goes to the next worker (a failed connection always does, each marking one
        down or excluded, so this ends at main at the latest; after a worker that gave no
        response only a request `how` allows to be resent, once). Every failure left is
        answered with a Matrix error. A client that leaves abandons the exchange."""
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
        while True:
            upstream = decision.upstream or state.main
            if upstream is None:  # not in reverse mode: mitmproxy forwards it as addressed
                self._hand_to_mitmproxy(flow, exchange, fields, path)
                return
            exchange.in_upstream = True  # closing the exchange abandons the upstream one
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
                over = exchange.closed or not flow.client_conn.state & ConnectionState.CAN_READ
                on_worker = decision.upstream is not None
                verdict = failover.after_failure(
                    e.failure,
                    refused=e.refused,
                    over=over,
                    on_worker=on_worker,
                    resendable=how is Sending.RESEND,
                    resent=resent,
                )
                if verdict.step is Step.GIVE_UP:
                    exchange.note(FailureKind.CLIENT_GONE)
                    flow.kill()  # type: ignore[no-untyped-call]  # the client left: nothing to answer
                    return
                if verdict.mark_down and decision.upstream is not None:
                    self.health.mark_down(decision.upstream.url, str(e))
                if verdict.resend:
                    resent = True
                    state.metrics.observe_retry(decision.pool)
                if verdict.step is Step.ANSWER:
                    exchange.note(e.failure)
                    respond(flow, self._answer(verdict.answer, e.failure))
                    return
                decision = self.routing.fail_over(flow, exchange, decision, verdict.reason, str(e))
                if flow.response is not None:  # answered by the router: no writer left
                    return
                continue
            finally:
                exchange.in_upstream = False
            if isinstance(answer, upstream_client.StreamedAnswer):
                await self._hand_to_relay(flow, exchange, answer)
                return
            answer.timestamp_end = time.time()
            flow.response = answer
            return

    async def _hand_to_relay(
        self, flow: http.HTTPFlow, exchange: Exchange[http.HTTPFlow], answer: upstream_client.StreamedAnswer
    ) -> None:
        """Let mitmproxy forward the (redacted) request to the relay, which answers it with the
        worker's answer as it arrives; mitmproxy streams that to the client (Routing)."""
        try:
            port = await self.relay.start()
        except OSError:
            answer.close()
            respond(flow, matrix_error(502, "M_UNKNOWN", "The server gave no response."))
            return
        if exchange.closed or not flow.live or not flow.client_conn.state & ConnectionState.CAN_READ:
            answer.close()
            exchange.note(FailureKind.CLIENT_GONE)
            flow.kill()  # type: ignore[no-untyped-call]  # the client left meanwhile
            return
        data = flow.request.data
        data.scheme, data.host, data.port = b"http", self.relay.host, port
        flow.request.headers[RELAY_HEADER] = self.relay.hand(answer)
        exchange.sending = None
        flowdata.set_relayed(flow)

    def _answer(self, answer: Answer | None, failure: FailureKind) -> http.Response:
        """The Matrix error for a failure failover.py says to answer."""
        if answer is Answer.GATEWAY_TIMEOUT:
            return matrix_error(504, "M_UNKNOWN", "The server did not answer in time.")
        if answer is Answer.NO_RESPONSE:
            return matrix_error(502, "M_UNKNOWN", "The server gave no response.")
        return self._unavailable(failure)

    def _unavailable(self, failure: FailureKind) -> http.Response:
        """No process could take the request: every worker of its chain and main failed."""
        retry_after = self.state.workers.config.retry_after
        if failure is FailureKind.NO_RESPONSE:
            return matrix_error(502, "M_UNKNOWN", "The server gave no response.", retry_after)
        if failure is FailureKind.CONNECT_TIMEOUT:
            return matrix_error(504, "M_UNKNOWN", "No Synapse process answered in time.", retry_after)
        return no_process_available(retry_after)

    def _hand_to_mitmproxy(
        self, flow: http.HTTPFlow, exchange: Exchange[http.HTTPFlow], fields: tuple[tuple[bytes, bytes], ...], path: str
    ) -> None:
        """Let mitmproxy forward the request to the flow's target, token and all."""
        credentials.restore(flow, fields, path)
        exchange.sending = None
        decision = flowdata.decision(flow)
        if decision is not None and decision.upstream is not None:
            exchange.await_connection()

    async def _abandon_left_forever(self) -> None:
        """Close the worker connection of each router-sent exchange whose client has closed its
        connection, as mitmproxy does for the requests it forwards (so a client dropping
        long-polls cannot pin worker connections and descriptors)."""
        while True:
            await asyncio.sleep(CLIENT_SWEEP_INTERVAL)
            for client_exchanges in list(self.state.exchanges.open.values()):
                for exchange in list(client_exchanges.values()):
                    if exchange.in_upstream and not exchange.flow.client_conn.state & ConnectionState.CAN_READ:
                        self.state.upstream.abandon(exchange.key)
