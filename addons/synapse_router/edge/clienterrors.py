"""Requests the router answers itself below the hooks (in mitmproxy's HTTP/1 server layer,
compat/http1.py, or a connection timer) because the client broke the request's framing or stalled
its body: a fixed vocabulary, so the access log and the flow can say what happened (the
reason, never a byte the client sent).

The layer has no flow to mark: it reports the failure as the flow's error message, made by
`message` and read back by `parse`.
"""

from __future__ import annotations

from dataclasses import dataclass

BAD_CHUNKED_BODY = "bad_chunked_body"
BODY_TIMEOUT = "body_timeout"


@dataclass(frozen=True, slots=True)
class ClientError:
    status: int
    reason: str  # one of the constants above
    errcode: str
    text: str  # the Matrix error's `error`


ERRORS: dict[str, ClientError] = {
    BAD_CHUNKED_BODY: ClientError(400, BAD_CHUNKED_BODY, "M_UNKNOWN", "Malformed chunked request body."),
    BODY_TIMEOUT: ClientError(408, BODY_TIMEOUT, "M_UNKNOWN", "Timed out reading the request body."),
}

_PREFIX = "synapse-router: answered "


def message(error: ClientError) -> str:
    """The flow error message that reports `error` (no client byte in it)."""
    return f"{_PREFIX}{error.status} ({error.reason})"


def parse(msg: str | None) -> ClientError | None:
    """The ClientError a flow error message reports, or None."""
    if msg is None or not msg.startswith(_PREFIX):
        return None
    reason = msg[len(_PREFIX) :].partition("(")[2].rstrip(")")
    return ERRORS.get(reason)
