"""Observation: what each request shows once it is over. Debug headers, credentials redacted
in the flow, the decision kept as plain data, in-flight counts, metrics and the access log
(to its file, or mitmproxy's event log)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TextIO

from mitmproxy import connection, http
from mitmproxy.connection import ConnectionState

from ..config import ConfigError, RouterConfig
from ..edge import clienterrors
from ..observability.accesslog import AccessLogFormatter, AccessRecord
from ..routing.engine import ROUTER, Decision
from . import credentials, flowdata
from .state import RouterState

access_log = logging.getLogger("synapse_router.access")


class Observation:
    def __init__(self, state: RouterState) -> None:
        self.state = state
        self.debug_headers = False
        self._access: AccessLogFormatter | None = None
        self._access_file: TextIO | None = None  # None: the mitmproxy event log

    def prepare(self, config: RouterConfig) -> Callable[[], None]:
        """Opens the access log file now: a path that cannot be opened fails the whole
        configuration (ConfigError naming access_log.path) before anything of it is used."""
        access = config.access_log
        formatter = AccessLogFormatter(access.format, access.include_user) if access.enabled else None
        opened = None
        if access.enabled and access.path:
            try:
                opened = open(access.path, "a", encoding="utf-8", buffering=1)  # noqa: SIM115
            except OSError as e:
                raise ConfigError(("access_log", "path"), f"cannot open {access.path}: {e.strerror or e}") from None

        def switch() -> None:
            self._close_file()
            self._access, self._access_file = formatter, opened
            self.debug_headers = config.debug_headers

        return switch

    def done(self) -> None:
        self._close_file()
        self._access = None

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        """Debug headers go on before the response headers leave: a streamed response (every
        JSON answer of Synapse's, chunked) is sent on as its headers arrive. mitmproxy calls this
        hook for responses addons make too."""
        if not self.debug_headers or flow.response is None:
            return
        decision = flowdata.decision(flow)
        if decision is not None:
            flow.response.headers["X-Synapse-Router-Route"] = decision.route
            flow.response.headers["X-Synapse-Router-Pool"] = decision.pool
            flow.response.headers["X-Synapse-Router-Worker"] = decision.worker

    def response(self, flow: http.HTTPFlow) -> None:
        decision = flowdata.decision(flow)
        if decision is None:  # answered before routing (a limit, mitmproxy itself)
            credentials.redact_answered(flow)
            return
        self._finish(flow, decision)

    def error(self, flow: http.HTTPFlow) -> None:
        decision = flowdata.decision(flow)
        if decision is None:  # refused by mitmproxy's parser, or failed before routing
            credentials.redact_answered(flow)
            return
        self._finish(flow, decision, _mitmproxy_error_status(flow))

    def client_disconnected(self, client: connection.Client) -> None:
        """The client has gone: a flow of its that neither `response` nor `error` ended (mitmproxy
        failing inside its HTTP layer, say) is ended now, so its in-flight count, connection
        registration and access-log line are not lost."""
        for flow in list(self.state.unfinished.pop(client.id, {}).values()):
            decision = flowdata.decision(flow)
            if decision is not None:
                self._finish(flow, decision)

    def _finish(self, flow: http.HTTPFlow, decision: Decision, error_status: int | None = None) -> None:
        state = self.state
        flows = state.unfinished.get(flow.client_conn.id)
        if flows is not None:
            flows.pop(flow.id, None)
            if not flows:
                del state.unfinished[flow.client_conn.id]
        flowdata.settle_decision(flow, decision)
        if state.connecting.get(flow.client_conn.id) is flow:
            del state.connecting[flow.client_conn.id]
        if decision.upstream is not None:
            url = decision.upstream.url
            state.in_flight[url] = max(0, state.in_flight.get(url, 0) - 1)
        try:
            self._observe(flow, decision, error_status)  # first: it reads the client error mitmproxy's layer gave
        finally:
            credentials.redact_answered(flow)

    def _observe(self, flow: http.HTTPFlow, decision: Decision, error_status: int | None) -> None:
        request, response = flow.request, flow.response
        upstream_seconds = None
        asked = decision.worker != ROUTER  # a refusal or a writer-down 503: no process was asked
        if asked and response is not None and response.timestamp_start and request.timestamp_end:
            upstream_seconds = max(0.0, (response.timestamp_end or response.timestamp_start) - request.timestamp_end)
        status = response.status_code if response is not None else error_status
        client_error = flowdata.client_error(flow)
        if client_error is None and flow.error is not None and (found := clienterrors.parse(flow.error.msg)):
            # answered in mitmproxy's HTTP/1 layer (compat/http1.py): the flow has no response
            status, client_error = found.status, found.reason
        upstream = decision.upstream
        if upstream is None or (decision.pool, upstream.url) in self.state.published:
            # Not for a worker a reload removed from this pool while this request was on it:
            # its series are gone and must not come back (the access log still has the line).
            self.state.metrics.observe_request(
                decision.route, decision.pool, decision.worker, request.method, status, upstream_seconds
            )
        if self._access is None:
            return
        record = AccessRecord(
            time=request.timestamp_start,
            client_ip=flowdata.client_ip(flow),
            method=request.method,
            path=request.path,
            status=status,
            bytes_sent=_bytes_sent(flow),
            upstream_ms=upstream_seconds * 1000 if upstream_seconds is not None else None,
            total_ms=(time.time() - request.timestamp_start) * 1000,
            user_id=decision.key if decision.key_kind == "user" else None,
            token_hash=flowdata.token_label(flow),
            upload_cut=flowdata.upload_cut(flow),
            client_error=client_error,
        )
        record.set_decision(decision)
        line = self._access.format(record)
        if self._access_file is not None:
            self._access_file.write(line + "\n")
        else:
            access_log.info(line)

    def _close_file(self) -> None:
        if self._access_file is not None:
            self._access_file.close()
            self._access_file = None


def _bytes_sent(flow: http.HTTPFlow) -> int | None:
    """Body bytes sent to the client: a whole answer's, or a relayed one's as counted while it
    was streamed (None for other streamed answers: not counted)."""
    response = flow.response
    if response is None:
        return None
    if response.raw_content is not None:
        return len(response.raw_content)
    return flowdata.streamed_bytes(flow)


def _mitmproxy_error_status(flow: http.HTTPFlow) -> int | None:
    """The status mitmproxy answers a flow it forwarded and that failed upstream before any
    response byte, where StreamedErrors could not answer instead: 502, with its own page. None
    when nothing is answered: the client left (or can no longer be written to), the flow was
    killed, or the response had begun."""
    if flow.response is not None or flow.error is None or flow.error.msg == flow.error.KILLED_MESSAGE:
        return None
    open_both_ways = flow.client_conn.state & ConnectionState.OPEN == ConnectionState.OPEN
    return 502 if open_both_ways else None
