"""ExchangeOwner: ends each exchange (routing/exchange.py) exactly once, from `response`, `error`
or `client_disconnected`, whichever comes first: every release (in-flight count, registrations,
the router's own upstream exchange), then the decision kept as plain data, then Observation
(metrics, access log), then the flow's credentials redacted. Each step runs even if the one
before it raised; a later hook for an exchange already over does nothing but redact.

How a failed exchange failed is read from mitmproxy's flow error here, once (`classify`), as a
FailureKind; nothing after it reads an error message's text.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mitmproxy import connection, http
from mitmproxy.connection import ConnectionState

from ..edge import clienterrors
from ..routing.exchange import Exchange, FailureKind
from . import credentials, flowdata
from .isolation import report
from .state import RouterState

if TYPE_CHECKING:
    from .observation import Observation


class ExchangeOwner:
    def __init__(self, state: RouterState, observation: Observation) -> None:
        self.state = state
        self.observation = observation

    def response(self, flow: http.HTTPFlow) -> None:
        exchange = self.state.exchanges.find(flow.client_conn.id, flow.id)
        if exchange is None:  # answered before routing (a limit, mitmproxy itself), or over already
            credentials.redact_answered(flow)
            return
        self._end(flow, exchange, None)

    def error(self, flow: http.HTTPFlow) -> None:
        exchange = self.state.exchanges.find(flow.client_conn.id, flow.id)
        if exchange is None:  # refused by mitmproxy's parser, failed before routing, or over already
            credentials.redact_answered(flow)
            return
        decision = flowdata.decision(flow)
        if decision is not None and decision.refused and flow.response is not None and killed(flow):
            # The router answered it and closed the connection (answer_and_close): answered.
            self._end(flow, exchange, None)
            return
        self._end(flow, exchange, classify(flow))

    def client_disconnected(self, client: connection.Client) -> None:
        """The client has gone: an exchange of its that neither `response` nor `error` ended
        (mitmproxy failing inside its HTTP layer, a hook still running) ends now."""
        for exchange in self.state.exchanges.of_client(client.id):
            # A client the router answered and closed (a body it could not read) did not leave.
            answered = flowdata.client_error(exchange.flow) is not None
            try:
                self._end(exchange.flow, exchange, FailureKind.CLIENT_ERROR if answered else FailureKind.CLIENT_GONE)
            except Exception as e:  # noqa: BLE001 - the client's other exchanges end all the same
                report("ExchangeOwner.client_disconnected", e)

    def _end(self, flow: http.HTTPFlow, exchange: Exchange[http.HTTPFlow], failure: FailureKind | None) -> None:
        decision = flowdata.decision(flow)
        try:
            exchange.close(failure)
        finally:
            try:
                if decision is not None:
                    flowdata.settle_decision(flow, decision)
                    self.observation.observe(flow, decision, exchange.failure)
            finally:
                credentials.redact_answered(flow)


def classify(flow: http.HTTPFlow) -> FailureKind:
    """How a flow mitmproxy reports failed (the `error` hook) failed: the one place the router
    reads mitmproxy's error message. A client error the router answered below the hooks
    (clienterrors) is kept on the flow for the access log."""
    if killed(flow):
        return FailureKind.KILLED
    error = flow.error
    found = clienterrors.parse(error.msg if error is not None else None)
    if found is not None:
        if flowdata.client_error(flow) is None:
            flowdata.set_client_error(flow, found.reason)
        return FailureKind.CLIENT_ERROR
    if flowdata.client_error(flow) is not None:
        return FailureKind.CLIENT_ERROR  # answered by the router on the connection (a 408), which it then closed
    if flow.client_conn.state & ConnectionState.OPEN != ConnectionState.OPEN:
        return FailureKind.CLIENT_GONE
    if flow.server_conn.timestamp_tcp_setup is None:
        return FailureKind.CONNECT_ERROR
    return FailureKind.NO_RESPONSE


def killed(flow: http.HTTPFlow) -> bool:
    """The flow was killed (`flow.kill()`: by the router, or an operator in mitmweb)."""
    error = flow.error
    return error is not None and error.msg == error.KILLED_MESSAGE
