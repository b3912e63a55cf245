"""Responses the router makes itself: Matrix error bodies, as Synapse would send them."""

from __future__ import annotations

import json

from mitmproxy import http

from ..edge.limits import CORS_HEADERS


def matrix_error(status: int, errcode: str, message: str, retry_after: int | None = None) -> http.Response:
    headers = {"Content-Type": "application/json", "Cache-Control": "no-store", **dict(CORS_HEADERS)}
    if retry_after is not None:
        headers["Retry-After"] = str(retry_after)
    body = json.dumps({"errcode": errcode, "error": message} | ({"soft_logout": False} if status == 401 else {}))
    return http.Response.make(status, body.encode(), headers)


def no_process_available(retry_after: int) -> http.Response:
    return matrix_error(503, "M_UNKNOWN", "No Synapse process is available.", retry_after)


def respond(flow: http.HTTPFlow, response: http.Response) -> None:
    """Answer the flow with a response the router made. A HEAD gets the headers only (its
    Content-Length still the body's, as RFC 9110 allows): a body after a HEAD answer would be
    read as the start of the next response on a kept-alive connection."""
    if flow.request.method == "HEAD":
        response.raw_content = b""
    flow.response = response
