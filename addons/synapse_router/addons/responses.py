"""Responses the router makes itself: Matrix error bodies, as Synapse would send them."""

from __future__ import annotations

import json

from mitmproxy import http

from ..limits import CORS_HEADERS


def matrix_error(status: int, errcode: str, message: str, retry_after: int | None = None) -> http.Response:
    headers = {"Content-Type": "application/json", "Cache-Control": "no-store", **dict(CORS_HEADERS)}
    if retry_after is not None:
        headers["Retry-After"] = str(retry_after)
    body = json.dumps({"errcode": errcode, "error": message} | ({"soft_logout": False} if status == 401 else {}))
    return http.Response.make(status, body.encode(), headers)
