"""Keeping credentials out of what mitmproxy shows, saves or prints: flows and the event log."""

from __future__ import annotations

import logging
import re
from copy import copy as shallow_copy

from mitmproxy import contentviews, ctx, http
from mitmproxy.contentviews import Metadata

from ..compat import printing
from ..identity import tokens
from ..observability import logsafety
from ..routing.query import pairs, query_param
from . import flowdata


def redact(flow: http.HTTPFlow) -> None:
    """Replace each Authorization header (however malformed; a bearer token keeps its short
    label, the routed token's when there is one, as the access log shows it), each Cookie and
    Proxy-Authorization header and each access_token parameter of the flow's request by a
    label. Once per flow: a flow redacted is marked so, until `restore` gives its credentials
    back."""
    if flowdata.redacted(flow):
        return
    flowdata.set_redacted(flow, True)
    request = flow.request
    label = flowdata.token_label(flow)
    fields = request.headers.fields
    shown_fields = tuple(_shown_field(name, value, label) for name, value in fields)
    if shown_fields != fields:
        request.headers.fields = shown_fields
    path, sep, query = request.path.partition("?")
    if not sep or ("access" not in query and "%" not in query):
        return  # no access_token parameter, not even a percent-encoded name
    if any(tokens.is_token_param(p) for p in pairs(query)):
        query_label = tokens.short_hash(tokens.token_key(query_param(query, tokens.TOKEN_PARAM) or ""))
        request.path = f"{path}?{tokens.redact_query_token(query, query_label)}"


def restore(flow: http.HTTPFlow, fields: tuple[tuple[bytes, bytes], ...], path: str) -> None:
    """Give the request back the header fields and path it had before `redact`."""
    flow.request.headers.fields = fields
    flow.request.path = path
    flowdata.set_redacted(flow, False)


def _shown_field(name: bytes, value: bytes, label: str | None) -> tuple[bytes, bytes]:
    lowered = name.lower()
    if lowered == b"authorization":
        shown = tokens.redact_authorization(value.decode("utf-8", "surrogateescape"), label)
        return name, shown.encode("utf-8", "surrogateescape")
    if lowered in logsafety.SECRET_REQUEST_HEADERS or lowered in logsafety.SECRET_RESPONSE_HEADERS:
        return name, logsafety.REDACTED.encode()
    return logsafety.shown_field(name, value) or (name, value)


def redact_answered(flow: http.HTTPFlow) -> None:
    """Once a request is over (answered or failed; nothing of it is sent any more): its
    credentials (`redact`), the secret fields of its body (a body that is not JSON is withheld
    whole) and its error's text (only what is known to quote no client byte stays), so that
    mitmweb, saved flows and mitmdump show none of them. The response is left as relayed."""
    redact(flow)
    request = flow.request
    if request.raw_content:
        shown = _shown_body(request)
        if shown is not None:
            request.raw_content = shown
    if flow.error is not None:
        flow.error.msg = logsafety.safe_message(flow.error.msg)


def _copy(flow: http.HTTPFlow) -> http.HTTPFlow:
    """A copy to redact for printing: its own request, response, error and metadata dict (not
    Flow.copy, which deep-copies the metadata: the router's per-flow objects)."""
    copy = shallow_copy(flow)
    copy.metadata = dict(flow.metadata)
    flowdata.set_redacted(copy, False)
    copy.request = flow.request.copy()
    copy.response = flow.response.copy() if flow.response is not None else None
    copy.error = shallow_copy(flow.error) if flow.error is not None else None
    return copy


def _shown_body(message: http.Message) -> bytes | None:
    if message.headers.get("content-encoding", "identity").strip().lower() not in ("", "identity"):
        return b"<body withheld by synapse-router: content-encoded>"
    return logsafety.shown_body(message.raw_content or b"")


def shown(flow: http.HTTPFlow) -> http.HTTPFlow:
    """What mitmdump's Dumper prints of a flow: at `flow_detail` >= 2 a copy with the answer's
    Set-Cookie fields and the secret fields of both bodies redacted (the flow itself keeps the
    answer as it was relayed); below, the flow itself (its URL and error were redacted when it
    was answered)."""
    if ctx.options.flow_detail < 2:
        return flow
    copy = _copy(flow)
    redact_answered(copy)
    response = copy.response
    if response is not None:
        response.headers.fields = tuple(_shown_field(name, value, None) for name, value in response.headers.fields)
        if response.raw_content:
            body = _shown_body(response)
            if body is not None:
                response.headers.pop("content-encoding", None)
                response.raw_content = body
    return copy


class SecretsWithheldView(contentviews.Contentview):
    """A content view that shows a JSON body with the secret fields of Matrix bodies
    (logsafety.SECRET_FIELDS) redacted, preferred to every built-in view for such a body: what
    mitmweb, the mitmproxy console and mitmdump show of it by default ("auto"). The body itself
    is not touched (a response is relayed as the worker sent it, and saved so)."""

    @property
    def name(self) -> str:
        return "Matrix, secrets withheld"

    def prettify(self, data: bytes, metadata: Metadata) -> str:
        shown = logsafety.redacted_json(data)
        if shown is not None:
            return shown.decode("utf-8", "replace")
        if logsafety.shown_body(data) is None:  # chosen by hand for JSON without secrets
            return data.decode("utf-8", "replace")
        return "<withheld: not JSON>"

    def render_priority(self, data: bytes, metadata: Metadata) -> float:
        return 100.0 if logsafety.redacted_json(data) is not None else -1.0


# A token as it may appear in a log line: an access_token parameter or a bearer credential.
_IN_LOG = re.compile(r"(?i)(access(?:_|%5f)token=)[^&\s'\"]+|(bearer[ \t]+)[^\s'\",]+")
# Libraries that log request headers (tokens included) at DEBUG: never below WARNING.
CHATTY_LOGGERS = ("httpx", "httpcore", "hpack", "h11")


_JUDGED = "synapse_router_judged"


class _ProxyLogFilter(logging.Filter):
    """On the loggers of mitmproxy's proxy layers: every record's text through the allow-list
    (logsafety.safe_message), and a traceback without the exception's text."""

    def __init__(self, only: str | None = None) -> None:
        super().__init__()
        self._only = only  # judge only the records whose text starts so

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, _JUDGED, False):
            return True  # by another instance (a reloaded script's, a test's)
        message = record.getMessage()
        if self._only is not None and not message.startswith(self._only):
            return True
        setattr(record, _JUDGED, True)
        shown = logsafety.safe_message(message)
        exc_info = record.exc_info
        if shown != message or exc_info:
            if exc_info and exc_info[0] is not None and exc_info[1] is not None:
                shown = f"{shown}\n{logsafety.traceback_without_message((exc_info[0], exc_info[1], exc_info[2]))}"
            record.msg, record.args, record.exc_info, record.exc_text = shown, None, None, None
        return True


# Loggers whose records may quote a client's bytes: mitmproxy's proxy layers (every line they
# emit goes through this logger), and "Addon error" lines, whose exception text may.
PROXY_LOGGERS = {
    "mitmproxy.proxy.server": None,
    "mitmproxy.addons.next_layer": None,  # "not enough data: <the client's first bytes, hex>"
    "mitmproxy.addonmanager": "Addon error",
    "synapse_router.launcher.lean": "Addon error",
    "mitmproxy.contentviews": "Contentview",
}


class _RedactingFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if ("ccess" in message or "earer" in message) and _IN_LOG.search(message):
            record.msg, record.args = _IN_LOG.sub(_label, message), None
        return True


def _label(match: re.Match[str]) -> str:
    return f"{match.group(1) or match.group(2)}<redacted>"


class LogRedaction:
    """Keeps client bytes and credentials out of the event log and mitmdump's output.
    mitmproxy's proxy layers quote what a client sent (`Bad HTTP request line: b'GET
    /...?access_token=...'`, `illegal chunk header: bytearray(b'...')`): every record of theirs
    passes an allow-list (logsafety.safe_message) on their logger. Libraries print request
    headers at DEBUG: held at WARNING. A token pattern filter on every handler of the root
    logger stays as a second line for other loggers. mitmdump's Dumper prints a redacted copy of
    each flow (`shown`), never the answer's tokens or cookies."""

    def __init__(self) -> None:
        self._filter = _RedactingFilter()
        self._proxy_filters = {name: _ProxyLogFilter(only) for name, only in PROXY_LOGGERS.items()}

    def load(self, loader: object) -> None:
        for name in CHATTY_LOGGERS:
            logging.getLogger(name).setLevel(logging.WARNING)
        contentviews.add(SecretsWithheldView())
        for name, proxy_filter in self._proxy_filters.items():
            logger = logging.getLogger(name)
            if proxy_filter not in logger.filters:
                logger.addFilter(proxy_filter)
        self._install()

    def running(self) -> None:
        self._install()  # handlers added since load (mitmweb's event store, say)
        printing.print_flows_through(ctx.master, shown)

    def done(self) -> None:
        for handler in logging.getLogger().handlers:
            handler.removeFilter(self._filter)
        for name, proxy_filter in self._proxy_filters.items():
            logging.getLogger(name).removeFilter(proxy_filter)

    def _install(self) -> None:
        for handler in logging.getLogger().handlers:
            if self._filter not in handler.filters:
                handler.addFilter(self._filter)
