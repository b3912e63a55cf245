"""The router's own upstream request, for requests it can retry on another worker.

mitmproxy answers a client 502 as soon as an upstream connection closes before the response,
and offers no hook to retry. For idempotent, bodiless requests (sync long-polls above all)
the addon sends the request itself: if the worker refuses the connection, times out
connecting, or closes before any response byte, the request goes to the next worker. Bytes
pass untouched both ways: no Accept-Encoding is added, nothing is decoded.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from dataclasses import dataclass

import httpx

from .config import Upstream

HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)
RETRYABLE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


@dataclass(slots=True)
class UpstreamResponse:
    status: int
    reason: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes
    headers_at: float  # when the response headers arrived (epoch seconds)


class NoResponse(Exception):
    """The worker gave no response byte: connection refused, timed out, or closed early."""


def make_client(connect_timeout: float, read_timeout: float | None) -> httpx.AsyncClient:
    client = httpx.AsyncClient(
        timeout=httpx.Timeout(connect=connect_timeout, read=read_timeout, write=30.0, pool=None),
        limits=httpx.Limits(max_connections=None, max_keepalive_connections=256),
        follow_redirects=False,
        trust_env=False,
    )
    client.headers = httpx.Headers()  # no default Accept-Encoding or User-Agent of httpx's own
    return client


def request_headers(headers: Iterable[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    return [(k, v) for k, v in headers if k.lower() not in HOP_BY_HOP]


async def send(
    client: httpx.AsyncClient,
    upstream: Upstream,
    method: str,
    path: str,
    headers: list[tuple[bytes, bytes]],
    abandon: asyncio.Event | None = None,
) -> UpstreamResponse:
    """Send a bodiless request to a worker; raise NoResponse if it never answered, or if
    `abandon` is set (the worker was found dead) before its response headers arrived."""
    url = f"{upstream.url}{path}"
    request = client.build_request(method, url, headers=headers)
    sending = asyncio.ensure_future(client.send(request, stream=True))
    if abandon is not None:
        waiting = asyncio.ensure_future(abandon.wait())
        try:
            await asyncio.wait({sending, waiting}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiting.cancel()
        if not sending.done():
            sending.cancel()
            raise NoResponse("worker marked down while waiting for its response")
    try:
        response = await sending
    except (httpx.ConnectError, httpx.ConnectTimeout, httpx.RemoteProtocolError, httpx.ReadError) as e:
        raise NoResponse(f"{type(e).__name__}: {e}") from e
    headers_at = time.time()
    try:
        body = b"".join([chunk async for chunk in response.aiter_raw()])
    finally:
        await response.aclose()
    out_headers = [(k, v) for k, v in response.headers.raw if k.lower() not in HOP_BY_HOP]
    bodiless = method == "HEAD" or response.status_code in (204, 304) or response.status_code < 200
    if not bodiless and "content-length" not in response.headers:  # was chunked or close-delimited
        out_headers.append((b"content-length", str(len(body)).encode()))
    return UpstreamResponse(response.status_code, response.reason_phrase.encode(), out_headers, body, headers_at)
