"""Responses the router makes itself: Matrix error bodies, as Synapse would send them."""

from __future__ import annotations

import json
import math

from mitmproxy import http
from mitmproxy.net.http import http1

from ..compat.connections import client_io
from ..edge.limits import CORS_HEADERS
from . import flowdata


def matrix_error(status: int, errcode: str, message: str, retry_after: int | None = None) -> http.Response:
    headers = {"Content-Type": "application/json", "Cache-Control": "no-store", **dict(CORS_HEADERS)}
    if retry_after is not None:
        headers["Retry-After"] = str(retry_after)
    body = json.dumps({"errcode": errcode, "error": message} | ({"soft_logout": False} if status == 401 else {}))
    return http.Response.make(status, body.encode(), headers)


LIMIT_EXCEEDED = "M_LIMIT_EXCEEDED"
MAX_RETRY_AFTER = 3600.0  # seconds: the most a 429 tells a client to wait


def too_many_requests(retry_after: float) -> http.Response:
    """A 429 as Synapse's own rate limits answer it: `retry_after_ms` in the body (what Matrix
    clients read) and Retry-After in whole seconds."""
    # At least a second, and the same wait in both: a client told to come back within a few
    # milliseconds would only loop on reconnects.
    retry_ms = max(1000, math.ceil(min(retry_after, MAX_RETRY_AFTER) * 1000))
    headers = {"Content-Type": "application/json", "Cache-Control": "no-store", **dict(CORS_HEADERS)}
    headers["Retry-After"] = str(math.ceil(retry_ms / 1000))
    body = {"errcode": LIMIT_EXCEEDED, "error": "Too many requests from this address.", "retry_after_ms": retry_ms}
    return http.Response.make(429, json.dumps(body).encode(), headers)


def cors_preflight() -> http.Response:
    """Synapse's answer to any OPTIONS request (synapse/http/server.py, OptionsResource): 200
    `{}` with its CORS headers."""
    headers = {"Content-Type": "application/json", **dict(CORS_HEADERS)}
    return http.Response.make(200, b"{}", headers)


def no_process_available(retry_after: int) -> http.Response:
    return matrix_error(503, "M_UNKNOWN", "No Synapse process is available.", retry_after)


def respond(flow: http.HTTPFlow, response: http.Response) -> None:
    """Answer the flow with a response the router made. A HEAD gets the headers only (its
    Content-Length still the body's, as RFC 9110 allows): a body after a HEAD answer would be
    read as the start of the next response on a kept-alive connection."""
    if flow.request.method == "HEAD":
        response.raw_content = b""
    flow.response = response


def set_debug_headers(flow: http.HTTPFlow, response: http.Response) -> None:
    """`debug_headers`: name the flow's route, pool and worker on `response` (nothing for a flow
    without a decision)."""
    decision = flowdata.decision(flow)
    if decision is not None:
        response.headers["X-Synapse-Router-Route"] = decision.route
        response.headers["X-Synapse-Router-Pool"] = decision.pool
        response.headers["X-Synapse-Router-Worker"] = decision.worker


def answer_and_close(flow: http.HTTPFlow, response: http.Response, why: str, debug_headers: bool = False) -> None:
    """Write `response` on the client's connection now and kill the flow: mitmproxy then closes
    the connection and writes nothing of its own. For an answer that cannot wait for mitmproxy's
    own path: in the `error` hook (mitmproxy would write its HTML page), or before a request
    body the router will not read (mitmproxy would wait for it before answering). Such an
    answer passes no `responseheaders` hook before it is written: `debug_headers` (the
    configuration's) puts the headers Observation puts on every other answer."""
    io = client_io(flow.client_conn.id)
    writer = getattr(io, "writer", None)
    if writer is None or writer.is_closing():
        flow.kill()  # type: ignore[no-untyped-call]
        return
    response.headers["Connection"] = "close"
    if debug_headers:
        set_debug_headers(flow, response)
    respond(flow, response)  # the flow's answer, bodiless for a HEAD
    writer.write(http1.assemble_response(response))  # type: ignore[no-untyped-call]
    if flow.request.timestamp_end is None and _declares_body(flow.request):
        flowdata.set_upload_cut(flow)
    flow.comment = f"{flow.comment} | answered {response.status_code}: {why}"  # kill() replaces the error
    flow.kill()  # type: ignore[no-untyped-call]  # mitmproxy closes the connection, no page


def _declares_body(request: http.Request) -> bool:
    """The request has a body to come (a chunked one, or a Content-Length other than 0)."""
    headers = request.headers
    return "transfer-encoding" in headers or headers.get("content-length", "0").strip() not in ("0", "")
