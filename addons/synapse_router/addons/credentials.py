"""Keeping credentials out of what mitmproxy shows, saves or prints: flows and the event log."""

from __future__ import annotations

import logging
import re

from mitmproxy import http

from .. import flowdata, tokens
from ..query import pairs, query_param


def redact(flow: http.HTTPFlow) -> None:
    """Replace each Authorization header (however malformed; a bearer token keeps its short
    label, the routed token's when there is one, as the access log shows it) and each
    access_token parameter of the flow's request by a label. Once per flow: a flow redacted
    is marked so, until `restore` gives its credentials back."""
    if flowdata.redacted(flow):
        return
    flowdata.set_redacted(flow, True)
    request = flow.request
    label = flowdata.token_label(flow)
    fields = request.headers.fields
    # One pass over the fields: mitmproxy's Headers.get_all/set_all each walk them in Python.
    names = [name.lower() for name, _ in fields]
    if b"authorization" in names:
        request.headers.fields = tuple(
            (name, _redacted_authorization(value, label)) if lowered == b"authorization" else (name, value)
            for lowered, (name, value) in zip(names, fields, strict=True)
        )
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


def _redacted_authorization(value: bytes, label: str | None) -> bytes:
    shown = tokens.redact_authorization(value.decode("utf-8", "surrogateescape"), label)
    return shown.encode("utf-8", "surrogateescape")


# A token as it may appear in a log line: an access_token parameter or a bearer credential.
_IN_LOG = re.compile(r"(?i)(access(?:_|%5f)token=)[^&\s'\"]+|(bearer[ \t]+)[^\s'\",]+")
# Libraries that log request headers (tokens included) at DEBUG: never below WARNING.
CHATTY_LOGGERS = ("httpx", "httpcore", "hpack", "h11")


class _RedactingFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if ("ccess" in message or "earer" in message) and _IN_LOG.search(message):
            record.msg, record.args = _IN_LOG.sub(_label, message), None
        return True


def _label(match: re.Match[str]) -> str:
    return f"{match.group(1) or match.group(2)}<redacted>"


class LogRedaction:
    """Keeps tokens out of the event log: mitmproxy itself logs a malformed request line as it
    came (`Bad HTTP request line: b'GET /...?access_token=...'`), and libraries print request
    headers at DEBUG. A filter on every handler of the root logger rewrites such lines."""

    def __init__(self) -> None:
        self._filter = _RedactingFilter()

    def load(self, loader: object) -> None:
        for name in CHATTY_LOGGERS:
            logging.getLogger(name).setLevel(logging.WARNING)
        self._install()

    def running(self) -> None:
        self._install()  # handlers added since load (mitmweb's event store, say)

    def done(self) -> None:
        for handler in logging.getLogger().handlers:
            handler.removeFilter(self._filter)

    def _install(self) -> None:
        for handler in logging.getLogger().handlers:
            if self._filter not in handler.filters:
                handler.addFilter(self._filter)
