"""Observation: what each request shows. Debug headers as the answer's head leaves, and once
its exchange is over (ExchangeOwner calls `observe`, once per exchange) its metrics and
access-log line (to its file, or mitmproxy's event log). It only observes: the exchange's
releases and the flow's redaction are ExchangeOwner's."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TextIO

from mitmproxy import http

from ..config import ConfigError, RouterConfig
from ..edge import clienterrors
from ..observability.accesslog import AccessLogFormatter, AccessRecord
from ..routing.engine import ROUTER, Decision
from ..routing.exchange import FailureKind
from . import flowdata
from .responses import set_debug_headers
from .state import RouterState

access_log = logging.getLogger("synapse_router.access")

# A flow mitmproxy forwarded that failed this way without a response (ExchangeOwner's `classify`:
# the client was still there both ways) got mitmproxy's own 502 page.
MITMPROXY_ANSWERS_502 = frozenset({FailureKind.CONNECT_ERROR, FailureKind.NO_RESPONSE})


class Observation:
    def __init__(self, state: RouterState) -> None:
        self.state = state
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
            self.state.debug_headers = config.debug_headers

        return switch

    def done(self) -> None:
        self._close_file()
        self._access = None

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        """Debug headers go on before the response headers leave: a streamed response (every
        JSON answer of Synapse's, chunked) is sent on as its headers arrive. mitmproxy calls this
        hook for responses addons make too."""
        if not self.state.debug_headers or flow.response is None:
            return
        set_debug_headers(flow, flow.response)

    def observe(self, flow: http.HTTPFlow, decision: Decision, failure: FailureKind | None) -> None:
        """An exchange is over (ExchangeOwner closed it, once): count it and write its
        access-log line. `failure`: how it failed, if it did."""
        request, response = flow.request, flow.response
        upstream_seconds = None
        asked = decision.worker != ROUTER  # a refusal or a writer-down 503: no process was asked
        if asked and response is not None and response.timestamp_start and request.timestamp_end:
            upstream_seconds = max(0.0, (response.timestamp_end or response.timestamp_start) - request.timestamp_end)
        client_error = flowdata.client_error(flow)
        if response is not None:
            status: int | None = response.status_code
        elif failure is FailureKind.CLIENT_ERROR and client_error in clienterrors.ERRORS:
            # answered in mitmproxy's HTTP/1 layer (compat/http1.py): the flow has no response
            status = clienterrors.ERRORS[client_error].status
        else:
            # A worker's side failed before any response byte while the client was there:
            # mitmproxy answered it 502 with its own page. Otherwise nothing was answered.
            status = 502 if failure in MITMPROXY_ANSWERS_502 else None
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
            paced_ms=paced * 1000 if (paced := flowdata.paced(flow)) is not None else None,
            total_ms=(time.time() - request.timestamp_start) * 1000,
            user_id=decision.key if decision.key_kind == "user" else None,
            token_hash=flowdata.token_label(flow),
            upload_cut=flowdata.upload_cut(flow),
            client_error=client_error,
            failure=failure.value if failure is not None else None,
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
