"""StreamedErrors: a Matrix error instead of mitmproxy's HTML 502 page when the worker fails
under a request mitmproxy forwards (a streamed body: media, over 1 MiB or of unknown length)
before any response byte reached the client.

mitmproxy 12 has no hook to replace that page: `HttpStream.handle_protocol_error` runs the
`error` hook and then hands the failure to the client's HTTP/1 layer, which writes the page
(`_http1.make_error_response`) and closes the connection. So in the `error` hook the router
writes its own answer on the client's connection (the same internals ConnectionLimits uses for
its 431, see `connection_limits.client_io`) and kills the flow: for a killed flow mitmproxy
closes the connection without a page. The connection is closed either way; an answer written
while the client is still uploading is marked for the access log (`upload_cut`): closing with
the rest of the upload unread resets the connection, and a client that writes its whole body
before reading may see that reset instead of the answer.
"""

from __future__ import annotations

from mitmproxy import http
from mitmproxy.connection import ConnectionState
from mitmproxy.net.http import http1

from ..edge.wellformed import head_relayable
from ..routing.exchange import FailureKind
from . import flowdata
from .connection_limits import client_io
from .exchange import killed
from .responses import matrix_error, no_process_available, respond
from .state import RouterState


class StreamedErrors:
    def __init__(self, state: RouterState) -> None:
        self.state = state

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        """A worker's answer mitmproxy would relay but must not: an informational or 101 answer
        (mitmproxy would take a 1xx for the final answer, desynchronising the connection, or
        turn it into a raw tunnel past the router; Synapse serves no WebSocket or other
        upgrade), or a head with a control byte in a field or the reason phrase (a bare CR a
        client could read as a line break). The router-sent path refuses the same."""
        response = flow.response
        if response is None or response.raw_content is not None or flowdata.decision(flow) is None:
            return  # not a worker's answer on mitmproxy's path (the router sent or made it)
        status = response.status_code
        if status >= 200 and head_relayable(response.data.reason, response.headers.fields):
            return
        why = f"the worker answered {status}" if status < 200 else "a control byte in the worker's response head"
        self._note(flow, FailureKind.NO_RESPONSE)
        self._answer_and_kill(flow, matrix_error(502, "M_UNKNOWN", "The server gave an invalid response."), why)

    def error(self, flow: http.HTTPFlow) -> None:
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
        else:
            response = matrix_error(502, "M_UNKNOWN", "The server gave no response.")
            self._note(flow, FailureKind.NO_RESPONSE)
        self._answer_and_kill(flow, response, flow.error.msg)

    def _note(self, flow: http.HTTPFlow, failure: FailureKind) -> None:
        """How the exchange failed (the flow is killed next: its `error` hook says only that)."""
        exchange = self.state.exchanges.find(flow.client_conn.id, flow.id)
        if exchange is not None:
            exchange.note(failure)

    @staticmethod
    def _answer_and_kill(flow: http.HTTPFlow, response: http.Response, why: str) -> None:
        """Write `response` on the client's connection and kill the flow: mitmproxy then closes
        the connection and writes nothing of its own."""
        io = client_io(flow.client_conn.id)
        writer = getattr(io, "writer", None)
        if writer is None or writer.is_closing():
            flow.kill()  # type: ignore[no-untyped-call]
            return
        response.headers["Connection"] = "close"
        respond(flow, response)  # the flow's answer, bodiless for a HEAD
        writer.write(http1.assemble_response(response))  # type: ignore[no-untyped-call]
        if flow.request.timestamp_end is None:
            flowdata.set_upload_cut(flow)
        flow.comment = f"{flow.comment} | answered {response.status_code}: {why}"  # kill() replaces the error
        flow.kill()  # type: ignore[no-untyped-call]  # mitmproxy closes the connection, no page
