"""StreamedErrors: a Matrix error instead of mitmproxy's HTML 502 page when the worker fails
under a request mitmproxy forwards (a streamed body: media, over 1 MiB or of unknown length)
before any response byte reached the client.

mitmproxy 12 has no hook to replace that page: `HttpStream.handle_protocol_error` runs the
`error` hook and then hands the failure to the client's HTTP/1 layer, which writes the page
(`_http1.make_error_response`) and closes the connection. So in the `error` hook the router
writes its own answer on the client's connection (the same internals ConnectionLimits uses for
its 431, see `compat/connections.py`) and kills the flow: for a killed flow mitmproxy
closes the connection without a page. The connection is closed either way; an answer written
while the client is still uploading is marked for the access log (`upload_cut`): closing with
the rest of the upload unread resets the connection, and a client that writes its whole body
before reading may see that reset instead of the answer.
"""

from __future__ import annotations

import weakref

from mitmproxy import http
from mitmproxy.connection import ConnectionState

from ..compat.http1 import INVALID_WORKER_HEAD
from ..edge.upstream_client import MAX_HEAD
from ..edge.wellformed import head_bytes, head_relayable, transfer_chunked
from ..routing.exchange import FailureKind
from . import flowdata
from .exchange import killed
from .responses import answer_and_close, matrix_error, no_process_available, respond
from .state import RouterState

# mitmproxy's Http1Client, for a head it cannot frame (two Transfer-Encoding fields, a bad
# Content-Length): only the wording of the answer depends on it.
UNPARSABLE_HEAD = "Cannot parse HTTP response"


class StreamedErrors:
    def __init__(self, state: RouterState) -> None:
        self.state = state
        # Flows whose worker head reached the responseheaders hook: mitmproxy accepted it.
        self._heads_seen: weakref.WeakSet[http.HTTPFlow] = weakref.WeakSet()

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        """A worker's answer mitmproxy would relay but must not: an informational or 101 answer
        (mitmproxy would take a 1xx for the final answer, desynchronising the connection, or
        turn it into a raw tunnel past the router; Synapse serves no WebSocket or other
        upgrade), a head with a control byte in a field or the reason phrase (a bare CR a
        client could read as a line break), a head over MAX_HEAD bytes, or a Transfer-Encoding
        other than `chunked` (read until the worker closes, relayed still encoded). The
        router-sent path refuses the same; nginx answers each 502."""
        response = flow.response
        if response is None or response.raw_content is not None or flowdata.decision(flow) is None:
            return  # not a worker's answer on mitmproxy's path (the router sent or made it)
        self._heads_seen.add(flow)
        status, reason, fields = response.status_code, response.data.reason, response.headers.fields
        if not 200 <= status <= 599:
            why = f"the worker answered {status}"
        elif not head_relayable(reason, fields):
            why = "a control byte in the worker's response head"
        elif head_bytes(reason, fields) > MAX_HEAD:
            why = f"a response head over {MAX_HEAD} bytes"
        elif (te := response.headers.get("transfer-encoding")) is not None and not transfer_chunked(te):
            why = "a Transfer-Encoding other than chunked"
        else:
            return
        self._note(flow, FailureKind.NO_RESPONSE)
        answer_and_close(flow, matrix_error(*INVALID_WORKER_HEAD), why, self.state.debug_headers)

    def error(self, flow: http.HTTPFlow) -> None:
        response = flow.response
        if (
            response is not None
            and response.raw_content is None
            and flow not in self._heads_seen
            and flowdata.decision(flow) is not None
        ):
            # mitmproxy refused the worker's head before any hook saw it (validate_inbound_headers:
            # Content-Length with Transfer-Encoding, ...): compat.http1 writes the Matrix 502 in
            # place of mitmproxy's page; the flow gets it too, for the access log and metrics.
            self._note(flow, FailureKind.NO_RESPONSE)
            respond(flow, matrix_error(*INVALID_WORKER_HEAD))
            flow.comment = f"{flow.comment} | answered 502: the worker's response head was refused"
            return
        if (
            flowdata.decision(flow) is None
            or flow.response is not None
            or flow.error is None
            or killed(flow)
            or not flow.live
        ):
            return
        # The worker's side failed (closed, reset, refused) while the client is still there:
        # what mitmproxy answers with its page. A client that left, or one that sent a bad
        # body while the worker is fine, is mitmproxy's to handle (nothing is answered).
        client = flow.client_conn
        if client.state & ConnectionState.CAN_READ != ConnectionState.CAN_READ:
            return
        if not client.state & ConnectionState.CAN_WRITE or flow.server_conn.state & ConnectionState.CAN_READ:
            return
        if flow.server_conn.timestamp_tcp_setup is None:  # never connected: every process refused
            response = no_process_available(self.state.workers.config.retry_after)
            self._note(flow, FailureKind.CONNECT_ERROR)
        elif flow.error.msg.startswith(UNPARSABLE_HEAD):  # mitmproxy's client layer could not frame the head
            response = matrix_error(*INVALID_WORKER_HEAD)
            self._note(flow, FailureKind.NO_RESPONSE)
        else:
            response = matrix_error(502, "M_UNKNOWN", "The server gave no response.")
            self._note(flow, FailureKind.NO_RESPONSE)
        answer_and_close(flow, response, flow.error.msg, self.state.debug_headers)

    def _note(self, flow: http.HTTPFlow, failure: FailureKind) -> None:
        """How the exchange failed (the flow is killed next: its `error` hook says only that)."""
        exchange = self.state.exchanges.find(flow.client_conn.id, flow.id)
        if exchange is not None:
            exchange.note(failure)
